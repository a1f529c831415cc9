"""Breadcrumbs `scope: tensor` on the CPU kernel (radix cuts + one masking pass) against
the torch path and the whole-tensor stable sort it replaced: bit for bit, signed zeros
included, with ties at both cuts, zeros, odd sizes, bf16-valued and float32 task vectors."""

from __future__ import annotations

import pytest
import torch

import mergebench
import mergebench.methods.breadcrumbs as breadcrumbs
from mergebench.engine.stream import sum_tasks
from mergebench.methods.breadcrumbs import crumbs

CUTS = [(0.9, 0.01), (0.3, 0.1), (0.5, 0.25), (0.95, 0.2), (0.02, 0.0), (0.5, 0.5), (0.2, 0.2)]


def sorted_tensor_scope(task_vectors, density, outlier, scaling):
    """The formula before any selection: a stable sort of each task's flattened tensor."""
    flat = task_vectors.reshape(task_vectors.shape[0], -1)
    return scaling * sum_tasks(crumbs(flat, density, outlier).reshape(task_vectors.shape))


def stacks():
    """Task stacks of odd sizes: few distinct |tau| (ties everywhere), zeros and -0.0,
    bf16-valued differences (as a bf16 pool gives) and plain float32 draws."""
    g = torch.Generator().manual_seed(7)
    tied = torch.randint(-3, 4, (3, 13, 7), generator=g).float() * 0.25
    tied[1, 2] = -0.0
    yield "tied", tied
    yield "one row", torch.randint(-1, 2, (2, 1, 29), generator=g).float()
    yield "1-D", torch.randint(-2, 3, (4, 31), generator=g).float() * -1.5
    base = torch.randn(3, 101, 3, generator=g).mul_(0.02)
    tuned = (base + torch.randn(base.shape, generator=g).mul_(0.002)).to(torch.bfloat16)
    yield "bf16", tuned.float() - base.to(torch.bfloat16).float()
    yield "float32", torch.randn(3, 257, 5, generator=g)
    yield "zeros", torch.zeros(2, 9, 3)


def assert_same(got, expected, what):
    assert got.dtype == expected.dtype == torch.float32, what
    assert torch.equal(got, expected), what
    assert torch.equal(torch.signbit(got), torch.signbit(expected)), what


@pytest.mark.parametrize("block", [1, 2, 7, 1 << 20])
@pytest.mark.parametrize(("density", "outlier"), CUTS)
def test_kernel_is_the_torch_path_and_the_sort_bit_for_bit(monkeypatch, block, density, outlier):
    monkeypatch.setattr(breadcrumbs, "BLOCK_NUMEL", block)
    for name, taus in stacks():
        for scaling in (0.3, -0.7):
            got = breadcrumbs._tensor_scope_kernel(taus, density, outlier, scaling)
            what = (name, density, outlier, scaling)
            assert_same(got, breadcrumbs._tensor_scope_delta(taus, density, outlier, scaling), what)
            assert_same(got, sorted_tensor_scope(taus, density, outlier, scaling), what)


@pytest.mark.parametrize("block", [1, 3, 1 << 20])
def test_ties_at_both_cuts_keep_the_lower_indices(monkeypatch, block):
    # n = 10, outlier 0.2 -> g = 2, density 0.5 -> k = 5: ranks 3..7 (1-based) are kept.
    # |tau| descending: 5 (i0) r1; the 3s (i1, i4, i6) r2-r4: the upper cut falls inside
    # them, i1 dropped; the 1s (i2, i3, i7, i9) r5-r8: the lower cut falls inside them, i9
    # dropped; the zeros (i5, i8) r9-r10 dropped.
    monkeypatch.setattr(breadcrumbs, "BLOCK_NUMEL", block)
    tau = torch.tensor([5.0, -3.0, 1.0, -1.0, 3.0, 0.0, -3.0, 1.0, -0.0, -1.0])
    expected = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0, 0.0, -3.0, 1.0, -0.0, -0.0])
    # A second task, its ties at other indices: |tau| 5 (i9); 3s i3, i5, i8; 1s i0, i2, i6,
    # i7; kept: i5, i8, i0, i2, i6.
    second = -tau.flip(0)
    expected_second = torch.tensor([1.0, 0.0, -1.0, 0.0, -0.0, -3.0, 1.0, -0.0, 3.0, -0.0])
    got = breadcrumbs._tensor_scope_kernel(tau[None], 0.5, 0.2, 1.0)
    assert_same(got, expected + 0.0, "one task")  # the sum from +0 turns -0.0 into +0.0
    both = breadcrumbs._tensor_scope_kernel(torch.stack([tau, second]), 0.5, 0.2, 1.0)
    assert torch.equal(both, expected + expected_second)
    assert_same(both, sorted_tensor_scope(torch.stack([tau, second]), 0.5, 0.2, 1.0), "two")


def test_kernel_writes_into_the_given_buffer():
    taus = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(1))
    out = torch.full((6, 5), float("nan"))
    got = breadcrumbs._tensor_scope_kernel(taus, 0.5, 0.1, 2.0, out)
    assert got.data_ptr() == out.data_ptr()
    assert_same(out, sorted_tensor_scope(taus, 0.5, 0.1, 2.0), "out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_kernel_merge_is_the_torch_formulas_merge(monkeypatch, dtype):
    g = torch.Generator().manual_seed(3)
    shapes = {"emb": (37, 11), "w": (9, 5, 3), "norm": (11,), "scalar": ()}
    pre = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    finetuned = {
        t: {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype)
            for k, v in pre.items()}
        for t in "abc"
    }  # fmt: skip
    params = {"density": 0.9, "outlier": 0.01, "scaling": 0.3, "scope": "tensor"}
    kernel = mergebench.merge("breadcrumbs", pre, finetuned, progress=False, **params)
    monkeypatch.setenv("MERGEBENCH_TORCH_KERNELS", "1")
    formulas = mergebench.merge("breadcrumbs", pre, finetuned, progress=False, **params)
    for key, value in formulas.state_dict().items():
        assert value.dtype == dtype, key
        assert torch.equal(bits(kernel.state_dict()[key]), bits(value)), key


def bits(tensor):
    return tensor.view(torch.int16 if tensor.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize(("start", "stop"), [(0, 1), (0, 77), (3, 40), (76, 77), (20, 21)])
def test_rank_cuts_are_the_kth_largest_with_the_counts_above(start, stop):
    from mergebench.engine.breadcrumbs_kernels import rank_cuts

    g = torch.Generator().manual_seed(5)
    taus = torch.randint(-4, 5, (3, 77), generator=g).float() * 0.125
    taus[2] = torch.randn(77, generator=g)
    cut_bits, above = rank_cuts(taus.numpy(), start, stop)
    cuts = torch.from_numpy(cut_bits.view("float32"))
    for t, size in enumerate(taus.abs()):
        for c, k in enumerate((start + 1, stop)):
            value = torch.sort(size, descending=True).values[k - 1]
            assert cuts[c, t] == value, (t, c)
            assert above[c, t] == int((size > value).sum()), (t, c)
