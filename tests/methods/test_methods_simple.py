"""Hand-computed cases for weight averaging, task arithmetic and TIES (methods.md)."""

from __future__ import annotations

import pytest
import torch
from conftest import vector_pool

import mergebench
from mergebench.methods.registry import build_method
from mergebench.methods.ties import keep_count
from mergebench.util.errors import MergeBenchError

# Three tasks over six entries, pretrained = 0, so W_t = tau_t.
TIES_TAUS = {
    "t1": [3.0, -1.0, 0.5, 2.0, 2.0, 0.0],
    "t2": [-2.0, -2.0, 1.0, 2.0, -2.0, 0.25],
    "t3": [1.0, 4.0, -1.0, -2.0, 0.5, 0.1],
}
# With k=0.5: keep = floor(3 + 0.5) = 3 per task.
#   t1 |.| 3,2,2 -> threshold 2 -> [3, 0, 0, 2, 2, 0]    (4 kept: tie at the threshold)
#   t2 |.| 2,2,2 -> threshold 2 -> [-2, -2, 0, 2, -2, 0] (4 kept: tie at the threshold)
#   t3 |.| 4,2,1 -> threshold 1 -> [1, 4, -1, -2, 0, 0]  (4 kept: tie at the threshold)
#   sum [2, 2, -1, 2, 0, 0] -> gamma [+, +, -, +, -, -]   (zero sums elect -1)
#   entry 4: t1=+2, t2=-2 sum to 0, so -1 is elected and only t2 agrees;
#   entry 5: every trimmed value is 0, so no task agrees.
TIES_SUM = [4.0, 4.0, -1.0, 4.0, -2.0, 0.0]
TIES_MEAN = [2.0, 4.0, -1.0, 2.0, -2.0, 0.0]


def merged(method: str, taus: dict, **params) -> torch.Tensor:
    pre, finetuned = vector_pool(taus)
    return mergebench.merge(method, pre, finetuned, progress=False, **params).state_dict()["w"]


def test_weight_averaging_is_the_mean_of_the_models():
    pre = {"w": torch.tensor([1.0, -1.0, 0.5])}
    finetuned = {
        "a": {"w": torch.tensor([2.0, 0.0, 0.5])},
        "b": {"w": torch.tensor([4.0, -3.0, 1.5])},
        "c": {"w": torch.tensor([0.0, 0.0, -2.0])},
    }
    out = mergebench.merge("weight_averaging", pre, finetuned, progress=False).state_dict()
    torch.testing.assert_close(out["w"], torch.tensor([2.0, -1.0, 0.0]))


def test_task_arithmetic_scales_the_sum_of_task_vectors():
    pre = {"w": torch.tensor([1.0, 1.0])}
    finetuned = {"a": {"w": torch.tensor([2.0, 1.0])}, "b": {"w": torch.tensor([1.0, 3.0])}}
    out = mergebench.merge("task_arithmetic", pre, finetuned, scaling=0.5, progress=False)
    torch.testing.assert_close(out.state_dict()["w"], torch.tensor([1.5, 2.0]))
    default = mergebench.merge("task_arithmetic", pre, finetuned, progress=False)  # scaling 0.3
    torch.testing.assert_close(default.state_dict()["w"], torch.tensor([1.3, 1.6]))


def test_task_arithmetic_and_averaging_merge_task_vectors():
    taus = torch.tensor([[1.0, -2.0, 4.0], [3.0, 2.0, -1.0]])
    ta = build_method("task_arithmetic", scaling=0.5).merge_task_vectors("w", taus)
    torch.testing.assert_close(ta, torch.tensor([2.0, 0.0, 1.5]), rtol=0, atol=0)
    wa = build_method("weight_averaging").merge_task_vectors("w", taus)
    torch.testing.assert_close(wa, torch.tensor([2.0, 0.0, 1.5]), rtol=0, atol=0)
    three = torch.cat([taus, torch.tensor([[2.0, 3.0, 0.0]])])
    wa3 = build_method("weight_averaging").merge_task_vectors("w", three)
    torch.testing.assert_close(wa3, torch.tensor([2.0, 1.0, 1.0]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("k", "n", "keep"),
    [
        (0.2, 4, 1),
        (0.25, 6, 2),
        (0.375, 4, 2),
        (0.125, 4, 1),
        (0.1, 3, 1),
        (0.5, 6, 3),
        (0.15, 10, 2),
        (0.149, 10, 1),
        (1.0, 7, 7),
        # Even integer parts: banker's rounding (round) would round these halves down.
        (0.25, 10, 3),
        (0.25, 18, 5),
        (0.125, 20, 3),
    ],
)
def test_keep_count_rounds_half_up_and_keeps_at_least_one(k, n, keep):
    assert keep_count(k, n) == keep


@pytest.mark.parametrize(
    ("k", "n", "keep"),
    [
        (0.25, 10, 3),  # 2.5: banker's rounding gives 2
        (0.125, 20, 3),  # 2.5
        (0.25, 18, 5),  # 4.5: banker's rounding gives 4
        (0.5, 9, 5),  # 4.5
        (0.125, 4, 1),  # 0.5 -> 1 (banker's gives 0, then max(1, .) = 1)
        (0.375, 4, 2),  # 1.5 -> 2 either way
        (0.5, 13, 7),  # 6.5: banker's rounding gives 6
    ],
)
def test_keep_count_rounds_even_halves_up(k, n, keep):
    assert keep_count(k, n) == keep


@pytest.mark.parametrize(("aggregate", "expected"), [("sum", TIES_SUM), ("mean", TIES_MEAN)])
def test_ties_trim_elect_disjoint_merge(aggregate, expected):
    out = merged("ties", TIES_TAUS, k=0.5, scaling=1.0, aggregate=aggregate, topk_scope="tensor")
    torch.testing.assert_close(out, torch.tensor(expected))


def test_ties_defaults_are_dis_sum_with_scaling_0_3():
    out = merged("ties", TIES_TAUS, k=0.5)
    torch.testing.assert_close(out, 0.3 * torch.tensor(TIES_SUM))


def test_ties_threshold_is_inclusive():
    # keep = 1, but both entries equal the threshold |2|: both are kept.
    out = merged("ties", {"a": [2.0, -2.0, 1.0, 0.0]}, k=0.25, scaling=1.0, aggregate="sum")
    # sum of trimmed = [2, -2, 0, 0] -> gamma [+, -, -, -]; each kept entry agrees with itself
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 0.0, 0.0]))


def test_ties_keeps_three_of_ten_at_k_0_25():
    # n = 10, k = 0.25: keep = floor(2.5 + 0.5) = 3 of the distinct magnitudes 10..1.
    tau = [10.0, -9.0, 8.0, -7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    pre, finetuned = {"w": torch.zeros(10)}, {"a": {"w": torch.tensor(tau)}}
    for scope in ("tensor", "global"):
        out = mergebench.merge(
            "ties", pre, finetuned, k=0.25, scaling=1.0, topk_scope=scope, progress=False
        ).state_dict()["w"]
        expected = torch.tensor([10.0, -9.0, 8.0] + [0.0] * 7)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_ties_global_versus_per_tensor_top_k():
    tau = {"w1": [4.0, 3.0], "w2": [1.0, 2.0]}
    pre = {k: torch.zeros(2) for k in tau}
    finetuned = {t: {k: torch.tensor(v) for k, v in tau.items()} for t in ("a", "b", "c")}
    common = dict(k=0.5, scaling=1.0, aggregate="mean", progress=False)
    # global: n = 4 entries, keep 2 -> threshold 3 over both tensors
    glob = mergebench.merge("ties", pre, finetuned, topk_scope="global", **common).state_dict()
    torch.testing.assert_close(glob["w1"], torch.tensor([4.0, 3.0]))
    torch.testing.assert_close(glob["w2"], torch.tensor([0.0, 0.0]))
    # per tensor: n = 2, keep 1 per tensor
    per = mergebench.merge("ties", pre, finetuned, topk_scope="tensor", **common).state_dict()
    torch.testing.assert_close(per["w1"], torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(per["w2"], torch.tensor([0.0, 2.0]))


def test_ties_global_threshold_matches_a_full_sort_on_random_data():
    g = torch.Generator().manual_seed(3)
    pre = {"a": torch.zeros(300), "b": torch.zeros(40, 7)}
    finetuned = {t: {k: torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in "xyz"}
    out = mergebench.merge(
        "ties", pre, finetuned, k=0.1, scaling=1.0, aggregate="sum", progress=False
    ).state_dict()
    # Reference: trim each task on its flattened vector with an explicit sort.
    # n = 300 + 40 * 7 = 580 entries per task; keep = floor(0.1 * 580 + 0.5) = 58.
    trimmed = []
    for ft in finetuned.values():
        flat = torch.cat([ft["a"].reshape(-1), ft["b"].reshape(-1)])
        assert flat.numel() == 580
        keep = 58
        threshold = flat.abs().sort(descending=True).values[keep - 1]
        trimmed.append(flat * (flat.abs() >= threshold))
    stack = torch.stack(trimmed)
    gamma = torch.where(stack.sum(0) > 0, 1.0, -1.0)
    expected = (stack * (stack * gamma > 0)).sum(0)
    torch.testing.assert_close(torch.cat([out["a"], out["b"].reshape(-1)]), expected)


@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_ties_cpu_kernel_equals_the_formula_over_several_blocks(aggregate):
    from mergebench.methods.ties import _BLOCK, _merge_blocks

    g = torch.Generator().manual_seed(0)
    shape = (3, 11, 6000)  # 66,000 entries per task: two full blocks and a partial one
    assert shape[1] * shape[2] > 2 * _BLOCK
    # Quarter steps: exact sums in any order, ties at the thresholds, zeros, zero sums.
    taus = torch.randint(-12, 13, shape, generator=g).float() * 0.25
    thresholds = torch.tensor([1.0, 2.0, 0.25])
    got = _merge_blocks(taus, thresholds, aggregate, 0.5)
    trimmed = taus * (taus.abs() >= thresholds.reshape(3, 1, 1))
    gamma = torch.where(trimmed.sum(0) > 0, 1.0, -1.0)
    agree = trimmed * gamma > 0
    total = (trimmed * agree).sum(0)
    if aggregate == "mean":
        count = agree.sum(0)
        total = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    assert got.shape == shape[1:] and got.dtype == torch.float32
    torch.testing.assert_close(got, 0.5 * total, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("params", "option"),
    [
        ({"k": 0.0}, "ties.k"),
        ({"k": 1.5}, "ties.k"),
        ({"aggregate": "max"}, "ties.aggregate"),
        ({"topk_scope": "layer"}, "ties.topk_scope"),
        ({"scaling": "big"}, "ties.scaling"),
    ],
)
def test_ties_rejects_bad_options(params, option):
    with pytest.raises(MergeBenchError, match=option.replace(".", r"\.")):
        merged("ties", TIES_TAUS, **params)


def test_unknown_method_and_option_are_named():
    with pytest.raises(MergeBenchError, match="unknown method 'tie'"):
        merged("tie", TIES_TAUS)
    with pytest.raises(MergeBenchError, match="unknown option 'scale'"):
        merged("task_arithmetic", TIES_TAUS, scale=0.3)
