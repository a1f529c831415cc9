"""Tests that kill mutants (`make mutation`, docs/mutation.md) the other tests let survive."""

from __future__ import annotations

import pytest
import torch

from mergebench.engine.bits import _pack_bits_torch, _unpack_bits_torch, pack_bits, unpack_bits
from mergebench.methods.registry import build_method, method_label


# --- engine/bits.py: the torch kernels (the GPU path) against the numpy ones --------------------
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 20])
def test_torch_bit_kernels_equal_numpy_in_dtype_shape_and_value(numel):
    g = torch.Generator().manual_seed(numel)
    mask = torch.rand(3, numel, generator=g) > 0.5
    packed = pack_bits(mask)
    torch_packed = _pack_bits_torch(mask)
    assert torch_packed.dtype == packed.dtype == torch.uint8
    assert torch_packed.shape == packed.shape == (3, (numel + 7) // 8)
    assert torch.equal(torch_packed, packed)
    for lead in [(), (3,), (1, 3)]:  # one row, rows, rows of rows
        rows = packed.reshape(lead + (packed.shape[-1],)) if lead else packed[1]
        want = mask.reshape(lead + (numel,)) if lead else mask[1]
        got = _unpack_bits_torch(rows, (numel,))
        assert got.dtype == torch.bool and got.shape == want.shape
        assert torch.equal(got, want)
        assert torch.equal(unpack_bits(rows, (numel,)), want)


def test_packed_bits_are_little_endian_powers_of_two():
    mask = torch.tensor([[True, False, False, False, False, False, False, True, True]])
    expected = torch.tensor([[1 + 128, 1]], dtype=torch.uint8)
    assert torch.equal(pack_bits(mask), expected)
    assert torch.equal(_pack_bits_torch(mask), expected)
    assert torch.equal(_unpack_bits_torch(expected[0], (3, 3)), mask.reshape(3, 3))


# --- method labels (the leaderboard row names of paper Table 8's EMR ablations) ------------------
@pytest.mark.parametrize(
    ("params", "label"),
    [
        ({}, "emr"),
        ({"rescaler": "global"}, "emr (global)"),
        ({"mask": False, "rescale": False}, "emr (elect)"),
        ({"rescale": False}, "emr (elect+mask)"),
        ({"mask": False}, "emr (elect+rescale)"),
        ({"mask": False, "rescale": False, "rescaler": "global"}, "emr (elect)"),
        ({"elect": False}, "emr (mean)"),
        ({"elect": False, "mask": False}, "emr (mean)"),
        ({"elect": False, "mask": False, "rescale": False}, "emr (mean only)"),
    ],
)
def test_emr_labels_name_the_ablation(params, label):
    from mergebench.methods.emr import EMR

    assert EMR.label(params) == label
    assert method_label("emr", params) == label


def test_dare_label_names_its_base():
    from mergebench.methods.dare import Dare

    assert method_label("dare") == "dare (task_arithmetic)"
    assert Dare.label({"base": "ties", "base_params": None}) == "dare (ties)"
    assert method_label("dare", {"base": "emr", "base_params": {"mask": False}}) == (
        "dare (emr (elect+rescale))"
    )


# --- TaskVectorMethod.merge_task_vectors of the simplest methods ---------------------------------
def test_task_arithmetic_and_averaging_merge_task_vectors():
    taus = torch.tensor([[1.0, -2.0, 4.0], [3.0, 2.0, -1.0]])
    ta = build_method("task_arithmetic", scaling=0.5).merge_task_vectors("w", taus)
    torch.testing.assert_close(ta, torch.tensor([2.0, 0.0, 1.5]), rtol=0, atol=0)
    wa = build_method("weight_averaging").merge_task_vectors("w", taus)
    torch.testing.assert_close(wa, torch.tensor([2.0, 0.0, 1.5]), rtol=0, atol=0)
    three = torch.cat([taus, torch.tensor([[2.0, 3.0, 0.0]])])
    wa3 = build_method("weight_averaging").merge_task_vectors("w", three)
    torch.testing.assert_close(wa3, torch.tensor([2.0, 1.0, 1.0]), rtol=0, atol=0)


# --- methods/ties.py: the numpy CPU kernel over several cache blocks -----------------------------
@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_ties_cpu_kernel_equals_the_formula_over_several_blocks(aggregate):
    from mergebench.engine.stream import thread_scratch
    from mergebench.methods.ties import _BLOCK, _merge_blocks

    g = torch.Generator().manual_seed(0)
    shape = (3, 11, 6000)  # 66,000 entries per task: two full blocks and a partial one
    assert shape[1] * shape[2] > 2 * _BLOCK
    # Quarter steps: exact sums in any order, ties at the thresholds, zeros, zero sums.
    taus = torch.randint(-12, 13, shape, generator=g).float() * 0.25
    thresholds = torch.tensor([1.0, 2.0, 0.25])
    got = _merge_blocks(taus, thresholds, aggregate, 0.5, thread_scratch())
    trimmed = taus * (taus.abs() >= thresholds.reshape(3, 1, 1))
    gamma = torch.where(trimmed.sum(0) > 0, 1.0, -1.0)
    agree = trimmed * gamma > 0
    total = (trimmed * agree).sum(0)
    if aggregate == "mean":
        count = agree.sum(0)
        total = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    assert got.shape == shape[1:] and got.dtype == torch.float32
    torch.testing.assert_close(got, 0.5 * total, rtol=0, atol=0)
