"""Hand-computed cases for EMR, its ablations, "X w/ M&R" and DARE (methods.md), and their
leaderboard labels."""

from __future__ import annotations

import pytest
import torch
from conftest import vector_pool

import mergebench
from mergebench.methods.registry import method_label
from mergebench.util.errors import MergeBenchError

# Two tensors, three tasks, pretrained = 0 (so W_t = tau_t).
#   A: t1 [2, -1, 3, 0, 1]  t2 [-1, -2, 1, 0, -1]  t3 [1, 1, -2, 0, 0]
#      sum [2, -2, 2, 0, 0] -> gamma [+, -, +, -, -] (zero sums elect -1)
#      eps (max |tau| over agreeing tasks) [2, 2, 3, 0 (none agree), 1] -> tau_uni [2, -2, 3, 0, -1]
#      masks: t1 [1,1,1,0,0]  t2 [0,1,1,0,1]  t3 [1,0,0,0,0]
#   B: t1 [1]  t2 [1]  t3 [-1] -> tau_uni [1]; masks t1 [1] t2 [1] t3 [0] (all false for t3)
TAUS = {
    "t1": {"A": [2.0, -1.0, 3.0, 0.0, 1.0], "B": [1.0]},
    "t2": {"A": [-1.0, -2.0, 1.0, 0.0, -1.0], "B": [1.0]},
    "t3": {"A": [1.0, 1.0, -2.0, 0.0, 0.0], "B": [-1.0]},
}
UNI = {"A": [2.0, -2.0, 3.0, 0.0, -1.0], "B": [1.0]}
MASKS = {
    "t1": {"A": [1, 1, 1, 0, 0], "B": [1]},
    "t2": {"A": [0, 1, 1, 0, 1], "B": [1]},
    "t3": {"A": [1, 0, 0, 0, 0], "B": [0]},
}
# tensor_mean: lam = (mean|tau_A| + mean|tau_B|) / (mean|M_A uni_A| + mean|M_B uni_B|)
#   t1 (7/5 + 1) / (7/5 + 1) = 1;  t2 (5/5 + 1) / (6/5 + 1) = 10/11;  t3 (4/5 + 1) / (2/5 + 0) = 9/2
LAM_TENSOR_MEAN = {"t1": 1.0, "t2": 10 / 11, "t3": 4.5}
# global: lam = sum|tau| / sum|M uni| over all entries: t1 8/8; t2 6/7; t3 5/2
LAM_GLOBAL = {"t1": 1.0, "t2": 6 / 7, "t3": 2.5}


def pool():
    pre = {"A": torch.zeros(5), "B": torch.zeros(1)}
    finetuned = {t: {k: torch.tensor(v) for k, v in taus.items()} for t, taus in TAUS.items()}
    return pre, finetuned


def run(method="emr", **params):
    pre, finetuned = pool()
    return mergebench.merge(method, pre, finetuned, progress=False, **params)


def expected_weights(lams, masks=MASKS, uni=UNI):
    return {
        t: {
            k: lams[t] * torch.tensor(uni[k]) * torch.tensor(masks[t][k], dtype=torch.float32)
            for k in uni
        }
        for t in lams
    }


def assert_task_weights(result, expected):
    for task, tensors in expected.items():
        state = result.state_dict(task)
        for key, value in tensors.items():
            torch.testing.assert_close(state[key], value, msg=f"{task}/{key}")


def test_emr_elect_masks_and_tensor_mean_rescalers():
    result = run()
    torch.testing.assert_close(result.unified["A"], torch.tensor(UNI["A"]))
    for task in TAUS:
        for key in UNI:
            mask = result.mask(task, key).to(torch.int64).tolist()
            assert mask == MASKS[task][key], (task, key)
    assert result.rescalers == pytest.approx(LAM_TENSOR_MEAN)
    assert_task_weights(result, expected_weights(LAM_TENSOR_MEAN))


def test_emr_global_rescaler_is_algorithm_1():
    result = run(rescaler="global")
    assert result.rescalers == pytest.approx(LAM_GLOBAL)
    assert_task_weights(result, expected_weights(LAM_GLOBAL))


def test_emr_without_rescale_uses_lambda_one():
    result = run(rescale=False)
    ones = {t: 1.0 for t in TAUS}
    assert result.rescalers == ones
    assert_task_weights(result, expected_weights(ones))


def test_emr_without_mask_uses_all_ones():
    # lam = (mean|tau_A| + mean|tau_B|) / (mean|uni_A| + mean|uni_B|), mean|uni_A| = 8/5
    #   t1 2.4 / 2.6 = 12/13;  t2 2 / 2.6 = 10/13;  t3 1.8 / 2.6 = 9/13
    lams = {"t1": 12 / 13, "t2": 10 / 13, "t3": 9 / 13}
    result = run(mask=False)
    assert result.masks is None
    assert result.rescalers == pytest.approx(lams)
    all_ones = {t: {"A": [1] * 5, "B": [1]} for t in TAUS}
    assert_task_weights(result, expected_weights(lams, masks=all_ones))


def test_emr_elect_only_gives_one_model_for_all_tasks():
    result = run(mask=False, rescale=False)
    for task in TAUS:
        torch.testing.assert_close(result.state_dict(task)["A"], torch.tensor(UNI["A"]))


def test_emr_without_election_uses_the_mean_task_vector():
    # uni_A = mean = [2/3, -2/3, 2/3, 0, 0], uni_B = [1/3]
    #   masks t1 [1,1,1,0,0]/[1]  t2 [0,1,1,0,0]/[1]  t3 [1,0,0,0,0]/[0]
    #   lam t1 2.4 / (2/5 + 1/3) = 36/11;  t2 2 / (4/15 + 1/3) = 10/3;  t3 1.8 / (2/15) = 27/2
    uni = {"A": [2 / 3, -2 / 3, 2 / 3, 0.0, 0.0], "B": [1 / 3]}
    masks = {
        "t1": {"A": [1, 1, 1, 0, 0], "B": [1]},
        "t2": {"A": [0, 1, 1, 0, 0], "B": [1]},
        "t3": {"A": [1, 0, 0, 0, 0], "B": [0]},
    }
    lams = {"t1": 36 / 11, "t2": 10 / 3, "t3": 13.5}
    result = run(elect=False)
    assert result.rescalers == pytest.approx(lams)
    assert_task_weights(result, expected_weights(lams, masks=masks, uni=uni))


# magnitude=sum (the official BEiT-3 script): eps is the SUM of the agreeing |tau_t|, on TAUS:
#   A: gamma [+, -, +, -, -] as above; eps [2+1, 1+2, 3+1, 0, 1] -> tau_uni [3, -3, 4, -0.0, -1]
#      (entry 4: sum 0 elects -1, so t2's -1 agrees: +1 would give +1, a sign of 0 gives 0)
#   B: gamma +, eps 1+1 -> [2]. Masks as for max (same signs).
UNI_SUM = {"A": [3.0, -3.0, 4.0, -0.0, -1.0], "B": [2.0]}
# tensor_mean: t1 (7/5 + 1) / (10/5 + 2) = 3/5;  t2 (5/5 + 1) / (8/5 + 2) = 5/9;
#              t3 (4/5 + 1) / (3/5 + 0) = 3
LAM_SUM = {"t1": 0.6, "t2": 5 / 9, "t3": 3.0}


@pytest.mark.parametrize("torch_kernels", ["0", "1"])  # the numpy kernels and the GPU's torch path
def test_emr_sum_magnitude_is_the_beit3_election(torch_kernels, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_TORCH_KERNELS", torch_kernels)
    result = run(magnitude="sum")
    for key, expected in UNI_SUM.items():
        assert result.unified[key].tolist() == expected, key
    assert torch.signbit(result.unified["A"][3])  # no task agrees: 0 * -1 = -0.0, as the script
    assert result.mask("t2", "A")[4]  # a negative task agrees where the sum is 0
    for task in TAUS:
        for key in UNI:
            assert result.mask(task, key).to(torch.int64).tolist() == MASKS[task][key]
    assert result.rescalers == pytest.approx(LAM_SUM)
    assert_task_weights(result, expected_weights(LAM_SUM, uni=UNI_SUM))


def test_emr_max_magnitude_is_the_default():
    assert run(magnitude="max").unified["A"].tolist() == UNI["A"]
    assert run().unified["A"].tolist() == UNI["A"]


@pytest.mark.parametrize("magnitude", ["max", "sum"])
def test_emr_streamed_equals_in_memory(magnitude, tmp_path):
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(70_000, generator=g), "b": torch.zeros(3)}  # several CPU blocks
    finetuned = {
        t: {k: v + torch.randint(-2, 3, v.shape, generator=g).float() for k, v in pre.items()}
        for t in ("a", "b", "c", "d")
    }  # coarse integer steps: many zero sums
    in_memory = mergebench.merge("emr", pre, finetuned, progress=False, magnitude=magnitude)
    streamed = mergebench.merge(
        "emr", pre, finetuned, progress=False, magnitude=magnitude, output_dir=tmp_path / "out"
    )
    assert streamed.rescalers == in_memory.rescalers
    for key in pre:
        u, v = in_memory.unified[key], streamed.unified[key]
        assert torch.equal(u.view(torch.int32), v.view(torch.int32)), key
        for task in finetuned:
            assert torch.equal(in_memory.mask(task, key), streamed.mask(task, key))
            assert torch.equal(in_memory.state_dict(task)[key], streamed.state_dict(task)[key])


def test_emr_rejects_an_unknown_magnitude():
    with pytest.raises(MergeBenchError, match=r"emr\.magnitude: 'mean' is not one of"):
        run(magnitude="mean")


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
        ({"magnitude": "sum"}, "emr (sum)"),
        ({"magnitude": "sum", "rescaler": "global"}, "emr (global, sum)"),
        ({"magnitude": "sum", "rescale": False}, "emr (elect+mask, sum)"),
        ({"magnitude": "sum", "elect": False}, "emr (mean)"),
    ],
)
def test_emr_labels_name_the_ablation(params, label):
    from mergebench.methods.emr import EMR

    assert EMR.label(params) == label
    assert method_label("emr", params) == label


def test_a_mask_that_is_all_false_gives_the_pretrained_weights():
    # Task z's vector disagrees with the elected sign everywhere.
    pre, finetuned = vector_pool({"x": [2.0, 2.0], "y": [1.0, 3.0], "z": [-1.0, -1.0]})
    pre["w"] = torch.tensor([0.5, -0.5])
    finetuned = {t: {"w": v["w"] + pre["w"]} for t, v in finetuned.items()}
    result = mergebench.merge("emr", pre, finetuned, progress=False)
    assert not result.mask("z", "w").any()
    assert result.rescalers["z"] == 0.0
    assert result.extra["empty_mask_tasks"] == ["z"]
    torch.testing.assert_close(result.state_dict("z")["w"], pre["w"])


@pytest.mark.parametrize("torch_kernels", ["0", "1"])
def test_a_task_whose_vector_is_zero_gets_lambda_zero_not_nan(torch_kernels, monkeypatch):
    # methods.md: the official code divides 0 by 0 here and returns NaN weights.
    monkeypatch.setenv("MERGEBENCH_TORCH_KERNELS", torch_kernels)
    pre = {"w": torch.tensor([0.5, -0.5, 1.0])}
    finetuned = {
        "x": {"w": pre["w"] + torch.tensor([1.0, -2.0, 0.5])},
        "zero": {"w": pre["w"].clone()},
    }
    for magnitude in ("max", "sum"):
        result = mergebench.merge("emr", pre, finetuned, progress=False, magnitude=magnitude)
        assert result.rescalers["zero"] == 0.0
        assert torch.equal(result.state_dict("zero")["w"], pre["w"])


# Masks compare signs (methods.md): entries too small for their product with tau_uni to be
# nonzero in float32 still keep their bits.
TAU_A = [1e-30, 2e-30, 0.01, -0.02]
TAU_B = [3e-30, 1e-30, 0.02, 0.01]


def tiny_entry_pool():
    pre = {"w": torch.zeros(4)}
    finetuned = {"a": {"w": torch.tensor(TAU_A)}, "b": {"w": torch.tensor(TAU_B)}}
    return pre, finetuned


@pytest.mark.parametrize("torch_kernels", ["0", "1"])  # the numpy kernels and the GPU's torch path
def test_emr_masks_keep_tiny_entries(torch_kernels, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_TORCH_KERNELS", torch_kernels)
    pre, finetuned = tiny_entry_pool()
    result = mergebench.merge("emr", pre, finetuned, progress=False)
    # gamma = sgn([4e-30, 3e-30, 0.03, -0.01]) = [+, +, +, -]; tau_uni = [3e-30, 2e-30, 0.02, -0.02]
    assert result.mask("a", "w").tolist() == [True, True, True, True]
    assert result.mask("b", "w").tolist() == [True, True, True, False]
    # The products tau_t * tau_uni of the first two entries underflow to 0 in float32:
    assert (torch.tensor(TAU_A) * torch.tensor([3e-30, 2e-30, 0.02, -0.02]))[:2].tolist() == [0, 0]


@pytest.mark.parametrize("torch_kernels", ["0", "1"])
def test_a_task_of_tiny_entries_keeps_its_rescaler(torch_kernels, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_TORCH_KERNELS", torch_kernels)
    pre = {"w": torch.zeros(3)}
    finetuned = {
        "tiny": {"w": torch.tensor([1e-30, 2e-30, 3e-30])},
        "big": {"w": torch.tensor([0.5, 0.1, 0.2])},
    }
    result = mergebench.merge("emr", pre, finetuned, progress=False)
    assert result.mask("tiny", "w").tolist() == [True, True, True]
    assert result.rescalers["tiny"] > 0
    assert "empty_mask_tasks" not in result.extra


def test_mask_rescale_on_task_arithmetic():
    # tau_uni = 0.3 * sum = A [0.6, -0.6, 0.6, 0, 0], B [0.3]
    #   masks t1 [1,1,1,0,0]/[1]  t2 [0,1,1,0,0]/[1]  t3 [1,0,0,0,0]/[0]
    #   lam t1 2.4 / (1.8/5 + 0.3) = 40/11;  t2 2 / (1.2/5 + 0.3) = 100/27;  t3 1.8 / 0.12 = 15
    result = run("mask_rescale", base="task_arithmetic")
    assert result.rescalers == pytest.approx({"t1": 40 / 11, "t2": 100 / 27, "t3": 15.0})
    torch.testing.assert_close(result.state_dict("t3")["A"], torch.tensor([9.0, 0, 0, 0, 0]))
    torch.testing.assert_close(result.state_dict("t3")["B"], torch.tensor([0.0]))
    torch.testing.assert_close(
        result.state_dict("t2")["A"], 100 / 27 * torch.tensor([0.0, -0.6, 0.6, 0.0, 0.0])
    )


def test_mask_rescale_on_ties():
    # TIES (k=0.5, dis-sum, scaling 0.3) on the TIES hand case gives
    # tau_uni = [1.2, 1.2, -0.3, 1.2, -0.6, 0] (see test_methods_simple.py).
    taus = {
        "t1": [3.0, -1.0, 0.5, 2.0, 2.0, 0.0],
        "t2": [-2.0, -2.0, 1.0, 2.0, -2.0, 0.25],
        "t3": [1.0, 4.0, -1.0, -2.0, 0.5, 0.1],
    }
    pre, finetuned = vector_pool(taus)
    result = mergebench.merge(
        "mask_rescale", pre, finetuned, base="ties", base_params={"k": 0.5}, progress=False
    )
    uni = torch.tensor([1.2, 1.2, -0.3, 1.2, -0.6, 0.0])
    torch.testing.assert_close(result.unified["w"], uni)
    masks = {"t1": [1, 0, 0, 1, 0, 0], "t2": [0, 0, 0, 1, 1, 0], "t3": [1, 1, 1, 0, 0, 0]}
    # lam = sum|tau| / sum|M uni|: t1 8.5/2.4, t2 9.25/1.8, t3 8.6/2.7
    lams = {"t1": 8.5 / 2.4, "t2": 9.25 / 1.8, "t3": 8.6 / 2.7}
    assert result.rescalers == pytest.approx(lams)
    for task, mask in masks.items():
        expected = lams[task] * uni * torch.tensor(mask, dtype=torch.float32)
        torch.testing.assert_close(result.state_dict(task)["w"], expected)


def test_mask_rescale_masks_compare_signs_too():
    pre, finetuned = tiny_entry_pool()
    result = mergebench.merge(
        "mask_rescale", pre, finetuned, progress=False, base="task_arithmetic"
    )
    # tau_uni = 0.3 * (tau_a + tau_b) = 0.3 * [4e-30, 3e-30, 0.03, -0.01]
    assert result.mask("a", "w").tolist() == [True, True, True, True]
    assert result.mask("b", "w").tolist() == [True, True, True, False]


def test_mask_rescale_rejects_task_conditioned_base():
    with pytest.raises(MergeBenchError, match="mask_rescale.base"):
        run("mask_rescale", base="emr")


def test_task_conditioned_result_needs_a_task():
    with pytest.raises(MergeBenchError, match="state_dict\\(task=...\\)"):
        run().state_dict()
    with pytest.raises(MergeBenchError, match="task 'nope'"):
        run().state_dict("nope")


# --- DARE ----------------------------------------------------------------------------------
def big_pool(n=200_000):
    g = torch.Generator().manual_seed(1)
    pre = {"w": torch.zeros(n)}
    finetuned = {t: {"w": torch.randn(n, generator=g)} for t in ("a", "b", "c")}
    return pre, finetuned


def test_dare_drops_about_p_and_rescales_the_rest():
    pre, finetuned = big_pool()
    out = mergebench.merge(
        "dare",
        pre,
        finetuned,
        base="task_arithmetic",
        base_params={"scaling": 1.0},
        drop=0.9,
        progress=False,
    )
    # With a single task the merged vector is that task's dropped vector.
    single = mergebench.merge(
        "dare", pre, {"a": finetuned["a"]}, base_params={"scaling": 1.0}, drop=0.9, progress=False
    ).state_dict()["w"]
    kept = single != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.005
    torch.testing.assert_close(single[kept], finetuned["a"]["w"][kept] / 0.1)
    assert out.state_dict()["w"].shape == (200_000,)


def test_dare_without_rescale_keeps_values():
    pre, finetuned = big_pool(10_000)
    single = mergebench.merge(
        "dare",
        pre,
        {"a": finetuned["a"]},
        base_params={"scaling": 1.0},
        drop=0.5,
        rescale=False,
        progress=False,
    ).state_dict()["w"]
    kept = single != 0
    torch.testing.assert_close(single[kept], finetuned["a"]["w"][kept])


def test_dare_is_reproducible_by_seed():
    pre, finetuned = big_pool(50_000)

    def dare(seed, base="ties"):
        return mergebench.merge(
            "dare", pre, finetuned, base=base, seed=seed, progress=False
        ).state_dict()["w"]

    assert torch.equal(dare(0), dare(0))
    assert not torch.equal(dare(0), dare(1))
    assert torch.equal(dare(7, "task_arithmetic"), dare(7, "task_arithmetic"))


def test_dare_with_no_drop_equals_its_base():
    pre, finetuned = big_pool(1000)
    for base in ("weight_averaging", "task_arithmetic", "ties"):
        plain = mergebench.merge(base, pre, finetuned, progress=False).state_dict()["w"]
        dare = mergebench.merge(
            "dare", pre, finetuned, base=base, drop=0.0, progress=False
        ).state_dict()["w"]
        torch.testing.assert_close(dare, plain)


def test_dare_rejects_bad_options():
    with pytest.raises(MergeBenchError, match="dare.drop"):
        run("dare", drop=1.0)
    with pytest.raises(MergeBenchError, match="dare.base"):
        run("dare", base="emr")
    with pytest.raises(MergeBenchError, match="unknown option 'k'"):
        run("dare", base="task_arithmetic", base_params={"k": 0.2})


def test_dare_label_names_its_base():
    from mergebench.methods.dare import Dare

    assert method_label("dare") == "dare (task_arithmetic)"
    assert Dare.label({"base": "ties", "base_params": None}) == "dare (ties)"
    assert method_label("dare", {"base": "emr", "base_params": {"mask": False}}) == (
        "dare (emr (elect+rescale))"
    )
