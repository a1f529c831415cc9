"""Model Breadcrumbs (methods.md): hand-computed rows, edge cases, the in-memory reference."""

from __future__ import annotations

import math

import pytest
import torch

import mergebench
from mergebench.methods.breadcrumbs import crumbs, row_keep_range
from mergebench.reference.breadcrumbs import breadcrumbs_reference
from mergebench.util.errors import MergeBenchError


def merge(pre, finetuned, **params):
    return mergebench.merge("breadcrumbs", pre, finetuned, progress=False, **params).state_dict()


def test_one_row_keeps_ranks_g_plus_1_to_g_plus_k_with_stable_ties():
    # n = 10, outlier 0.1 -> g = 1, density 0.3 -> k = 3: keep ranks 2, 3, 4.
    # |tau| descending: 4 (i1) r1, 3 (i5) r2, 2 (i2) r3, 2 (i3) r4, 2 (i8) r5, ...
    # The three 2s tie: the lower indices (2, 3) come first, so i8 is dropped.
    row = torch.tensor([0.5, -4.0, 2.0, 2.0, 1.0, -3.0, 0.0, 1.0, 2.0, 0.25])
    out = crumbs(row[None], density=0.3, outlier=0.1)[0]
    assert torch.equal(out, torch.tensor([0.0, 0.0, 2.0, 2.0, 0.0, -3.0, 0.0, 0.0, 0.0, 0.0]))


def test_rows_run_along_the_last_dimension():
    # n = 4: g = floor(0.25 * 4) = 1, k = floor(0.5 * 4) = 2 -> ranks 2, 3 of each row.
    tau = torch.tensor([[1.0, -5.0, 3.0, 2.0], [0.1, 0.2, -0.4, 0.3]])
    expected = torch.tensor([[0.0, 0.0, 3.0, 2.0], [0.0, 0.2, 0.0, 0.3]])
    assert torch.equal(crumbs(tau[None], 0.5, 0.25)[0], expected)
    # A 4-D convolution: rows are the kernel width (last dim), here 4 entries each.
    conv = tau.reshape(2, 1, 1, 4)
    assert torch.equal(crumbs(conv[None], 0.5, 0.25)[0], expected.reshape(2, 1, 1, 4))


def test_merge_sums_the_crumbs_of_every_task_and_scales():
    pre = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    # g = 1, k = 2 per task: keep the 2nd and 3rd largest |tau|.
    finetuned = {
        "a": {"w": torch.tensor([5.0, 3.0, -1.0, 2.0])},  # tau [4, 2, -2, 1] -> [0, 2, -2, 0]
        "b": {"w": torch.tensor([1.0, 0.0, 4.0, 2.5])},  # tau [0, -1, 3, 1.5] -> [0, -1, 0, 1.5]
    }
    out = merge(pre, finetuned, density=0.5, outlier=0.25, scaling=2.0)["w"]
    # sum [0, 1, -2, 1.5] * 2 + 1
    assert torch.equal(out, torch.tensor([1.0, 3.0, -3.0, 4.0]))


def test_defaults_are_density_0_1_outlier_0_01_scaling_1():
    # n = 100: g = 1, k = 10 -> ranks 2..11 of |tau| = 100, 99, ..., 1 (index i has 100 - i).
    tau = torch.arange(100, 0, -1, dtype=torch.float32)
    out = merge({"w": torch.zeros(100)}, {"a": {"w": tau}})["w"]
    expected = torch.zeros(100)
    expected[1:11] = tau[1:11]
    assert torch.equal(out, expected)


def test_row_shorter_than_one_over_density_keeps_nothing():
    # density 0.1 on rows of 9 entries: k = floor(0.9) = 0, the whole tensor is dropped.
    assert row_keep_range(9, 0.1, 0.01) == (0, 0)
    pre = {"w": torch.full((3, 9), 0.5), "b": torch.zeros(9)}
    g = torch.Generator().manual_seed(0)
    finetuned = {
        t: {k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in "ab"
    }
    out = merge(pre, finetuned)
    assert torch.equal(out["w"], pre["w"])
    assert torch.equal(out["b"], pre["b"])


def test_outlier_cut_plus_kept_past_the_row_keeps_to_its_end():
    # n = 4, outlier 0.3 -> g = 1, density 0.9 -> k = 3: ranks 2..4 (rank 5 does not exist).
    assert row_keep_range(4, 0.9, 0.3) == (1, 4)
    tau = torch.tensor([[-1.0, 4.0, 2.0, 3.0]])
    assert torch.equal(crumbs(tau, 0.9, 0.3)[0], torch.tensor([-1.0, 0.0, 2.0, 3.0]))


def test_zero_dimensional_tensor_is_kept_whole():
    pre = {"s": torch.tensor(1.0), "w": torch.zeros(4)}
    finetuned = {
        "a": {"s": torch.tensor(3.0), "w": torch.tensor([1.0, 2.0, 3.0, 4.0])},
        "b": {"s": torch.tensor(-0.5), "w": torch.zeros(4)},
    }
    out = merge(pre, finetuned, density=0.5, outlier=0.0, scaling=0.5)
    assert torch.equal(out["s"], torch.tensor(1.0 + 0.5 * (2.0 - 1.5)))
    assert torch.equal(out["w"], torch.tensor([0.0, 0.0, 1.5, 2.0]))


@pytest.fixture(scope="module")
def random_pool():
    g = torch.Generator().manual_seed(11)
    pre = {
        "embed.weight": torch.randn(40, 64, generator=g),
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "norm.weight": torch.ones(64),
        "short.bias": torch.zeros(7),  # rows shorter than 1/density
        "scale": torch.tensor(0.5),
        "half.weight": torch.randn(12, 30, generator=g).to(torch.float16),
        "position_ids": torch.arange(5),
        "head.weight": torch.randn(3, 64, generator=g),
    }
    finetuned = {}
    for task in ("a", "b", "c", "d"):
        ft = {}
        for key, value in pre.items():
            if value.is_floating_point():
                # Coarse steps give many exact ties in |tau|.
                step = torch.randint(-3, 4, value.shape, generator=g).float() * 0.25
                ft[key] = (value.float() + step).to(value.dtype)
            else:
                ft[key] = value.clone()
        finetuned[task] = ft
    return pre, finetuned


@pytest.mark.parametrize(
    "params",
    [{}, {"density": 0.3, "outlier": 0.1, "scaling": 0.7}, {"density": 0.95, "outlier": 0.2}],
)
def test_streamed_merge_is_bit_identical_to_the_reference(random_pool, params):
    pre, finetuned = random_pool
    exclude = [r"head\..*"]
    out = mergebench.merge(
        "breadcrumbs", pre, finetuned, exclude=exclude, progress=False, **params
    ).state_dict("a")
    expected = breadcrumbs_reference(pre, finetuned, exclude=exclude, **params)
    assert set(expected) == {k for k in pre if pre[k].is_floating_point() and k != "head.weight"}
    for key, value in expected.items():
        assert out[key].dtype == pre[key].dtype
        assert torch.equal(out[key], value), key
    assert torch.equal(out["head.weight"], finetuned["a"]["head.weight"])
    assert torch.equal(out["position_ids"], pre["position_ids"])


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("density", 0.0),
        ("density", 1.5),
        ("density", math.nan),
        ("outlier", 1.0),
        ("outlier", -0.1),
        ("outlier", math.nan),
        ("scaling", math.inf),
        ("scaling", math.nan),
        ("scaling", "big"),
    ],
)
def test_bad_options_are_errors_naming_the_option(option, value):
    pre, finetuned = {"w": torch.zeros(3)}, {"a": {"w": torch.ones(3)}}
    with pytest.raises(MergeBenchError, match=f"breadcrumbs.{option}"):
        merge(pre, finetuned, **{option: value})


def test_scope_tensor_ranks_the_whole_tensor_as_one_row():
    # 2 x 4 = 8 entries as one row: g = floor(0.125 * 8) = 1, k = floor(0.25 * 8) = 2,
    # so the 2nd and 3rd largest |tau| of the whole tensor survive (5 is the outlier; 4, -3
    # kept), whatever row they sit in; per row (scope=row) each row would keep its own.
    pre = {"w": torch.zeros(2, 4)}
    tau = torch.tensor([[5.0, 0.5, -3.0, 0.1], [1.0, 4.0, 0.2, 0.3]])
    got = merge(pre, {"a": {"w": tau}}, density=0.25, outlier=0.125, scope="tensor")["w"]
    assert torch.equal(got, torch.tensor([[0.0, 0.0, -3.0, 0.0], [0.0, 4.0, 0.0, 0.0]]))
    ref = breadcrumbs_reference(pre, {"a": {"w": tau}}, density=0.25, outlier=0.125, scope="tensor")
    assert torch.equal(ref["w"], got)
    per_row = merge(pre, {"a": {"w": tau}}, density=0.25, outlier=0.125)["w"]
    assert not torch.equal(per_row, got)


@pytest.mark.parametrize(("block", "reuse"), [(50, None), (700, None), (700, 200)])
def test_blocks_of_rows_give_the_reference_bit_for_bit(random_pool, monkeypatch, block, reuse):
    """The method masks blocks of rows (`BLOCK_NUMEL`), and big keys may come from the stream
    as row blocks (`REUSE_MAX_NUMEL`): neither changes a bit."""
    import mergebench.engine.stream as stream_module
    import mergebench.methods.breadcrumbs as breadcrumbs

    monkeypatch.setattr(breadcrumbs, "BLOCK_NUMEL", block)
    if reuse is not None:
        monkeypatch.setattr(stream_module, "REUSE_MAX_NUMEL", reuse)
    pre, finetuned = random_pool
    params = {"density": 0.3, "outlier": 0.1, "scaling": 0.7}
    out = mergebench.merge(
        "breadcrumbs", pre, finetuned, exclude=[r"head\..*"], progress=False, **params
    ).state_dict("a")
    expected = breadcrumbs_reference(pre, finetuned, exclude=[r"head\..*"], **params)
    for key, value in expected.items():
        assert torch.equal(out[key], value), key


def test_scope_tensor_is_the_same_when_the_stream_cuts_rows(random_pool, monkeypatch):
    """`scope: tensor` ranks a tensor as one row: big keys in row blocks (with the cuts
    counted over them first) give the whole keys' result."""
    import mergebench.engine.stream as stream_module

    pre, finetuned = random_pool
    params = {"density": 0.3, "outlier": 0.1, "scaling": 0.7, "scope": "tensor"}
    whole = mergebench.merge(
        "breadcrumbs", pre, finetuned, exclude=[r"head\..*"], progress=False, **params
    ).state_dict("a")
    monkeypatch.setattr(stream_module, "REUSE_MAX_NUMEL", 200)
    cut = mergebench.merge(
        "breadcrumbs", pre, finetuned, exclude=[r"head\..*"], progress=False, **params
    ).state_dict("a")
    for key, value in whole.items():
        assert torch.equal(cut[key], value), key


def sorted_tensor_scope(task_vectors, density, outlier, scaling):
    """`scope: tensor` the way it ran before the radix select: a stable sort of every task's
    whole flattened tensor (`crumbs` on one row), summed in task order, then scaled."""
    from mergebench.engine.stream import sum_tasks

    flat = task_vectors.reshape(task_vectors.shape[0], -1)
    masked = crumbs(flat, density, outlier).reshape(task_vectors.shape)
    return scaling * sum_tasks(masked)


def tied_stack(shape, seed, levels=4):
    """Task vectors whose |tau| take a few values, both signs and zeros: ties everywhere,
    at both cuts too."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-levels, levels + 1, shape, generator=g).float() * 0.5


@pytest.mark.parametrize("block", [1, 2, 5, 64, 1 << 20])
@pytest.mark.parametrize(
    ("density", "outlier"),
    [(0.1, 0.01), (0.3, 0.1), (0.5, 0.25), (0.9, 0.3), (0.95, 0.2), (0.02, 0.0), (0.5, 0.5)],
)
def test_scope_tensor_in_blocks_is_the_whole_tensor_sort_with_ties(monkeypatch, block,
                                                                   density, outlier):  # fmt: skip
    """The radix cuts applied block by block (down to one entry per task) keep exactly the
    entries a stable sort of the whole tensor keeps, equal |tau| at the cuts included."""
    import mergebench.methods.breadcrumbs as breadcrumbs

    monkeypatch.setattr(breadcrumbs, "BLOCK_NUMEL", block)
    for seed, shape, levels in [(0, (3, 9, 7), 4), (1, (4, 40), 1), (2, (2, 5, 2, 3), 2)]:
        taus = tied_stack(shape, seed, levels)
        got = breadcrumbs.breadcrumbs_delta(taus, density, outlier, -0.7, scope="tensor")
        expected = sorted_tensor_scope(taus, density, outlier, -0.7)
        assert torch.equal(got, expected), (seed, shape)
        # Signed zeros too (dropped negative entries give -0.0, as `tau * mask` does).
        assert torch.equal(torch.signbit(got), torch.signbit(expected)), (seed, shape)


@pytest.mark.parametrize("block", [1, 3, 100])
def test_scope_tensor_ties_at_the_cut_keep_the_lower_indices(monkeypatch, block):
    # 10 entries, outlier 0.1 -> g = 1, density 0.3 -> k = 3: ranks 2..4 of |tau| descending.
    # |tau|: 4 (i1) r1, then the five 2s tie at both cuts: ranks 2..6 by index (i0, i3, i5,
    # i6, i9), so i0, i3, i5 are kept and i6, i9 dropped, whatever the blocks.
    import mergebench.methods.breadcrumbs as breadcrumbs

    monkeypatch.setattr(breadcrumbs, "BLOCK_NUMEL", block)
    tau = torch.tensor([[2.0, -4.0, 1.0, -2.0, 0.0, 2.0, 2.0, 1.0, 0.5, -2.0]])
    expected = torch.tensor([2.0, 0.0, 0.0, -2.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(breadcrumbs.breadcrumbs_delta(tau, 0.3, 0.1, 1.0, "tensor"), expected)


@pytest.mark.parametrize("block", [50, 1 << 20])
def test_scope_tensor_streamed_merge_is_bit_identical_to_the_reference(random_pool, monkeypatch,
                                                                       block):  # fmt: skip
    import mergebench.methods.breadcrumbs as breadcrumbs

    monkeypatch.setattr(breadcrumbs, "BLOCK_NUMEL", block)
    pre, finetuned = random_pool
    for params in ({"density": 0.3, "outlier": 0.1, "scaling": 0.7}, {"density": 0.9}):
        params = {**params, "scope": "tensor"}
        out = mergebench.merge(
            "breadcrumbs", pre, finetuned, exclude=[r"head\..*"], progress=False, **params
        ).state_dict("a")
        expected = breadcrumbs_reference(pre, finetuned, exclude=[r"head\..*"], **params)
        for key, value in expected.items():
            assert torch.equal(out[key], value), (key, params)
