"""TALL masks (methods.md): task-conditioned `W_t = W_pre + m_t * tau_MTL`, strict masks,
per-task thresholds, save/load, and the in-memory reference."""

from __future__ import annotations

import math

import pytest
import torch

import mergebench
from mergebench.reference.tall_masks import tall_masks_reference
from mergebench.results import TaskConditionedResult
from mergebench.util.errors import MergeBenchError

PRE = [0.5, 0.5, 0.5, 0.5]
TAUS = {"t1": [1.0, 0.0, 2.0, -1.0], "t2": [1.0, 3.0, -1.0, 1.0]}
# tau_MTL = [2, 3, 1, 0]
# t1: |tau_MTL - tau| = [1, 3, 1, 1]; |tau| = [1, 0, 2, 1]
# t2: |tau_MTL - tau| = [1, 0, 2, 1]; |tau| = [1, 3, 1, 1]
MTL = [2.0, 3.0, 1.0, 0.0]


def run(**params) -> TaskConditionedResult:
    pre = {"w": torch.tensor(PRE)}
    finetuned = {t: {"w": torch.tensor(PRE) + torch.tensor(v)} for t, v in TAUS.items()}
    return mergebench.merge("tall_masks", pre, finetuned, progress=False, **params)


def test_masks_and_served_weights_by_hand():
    result = run()  # threshold 0.6, base task_arithmetic
    assert isinstance(result, TaskConditionedResult)
    # t1: [1, 0, 2, 1] > 0.6 * [1, 3, 1, 1] = [0.6, 1.8, 0.6, 0.6] -> [T, F, T, T]
    # t2: [1, 3, 1, 1] > 0.6 * [1, 0, 2, 1] = [0.6, 0, 1.2, 0.6]   -> [T, T, F, T]
    assert result.mask("t1", "w").tolist() == [True, False, True, True]
    assert result.mask("t2", "w").tolist() == [True, True, False, True]
    assert torch.equal(result.unified["w"], torch.tensor(MTL))
    assert result.rescalers == {"t1": 1.0, "t2": 1.0}
    # W_t = W_pre + m_t * tau_MTL
    assert torch.equal(result.state_dict("t1")["w"], torch.tensor([2.5, 0.5, 1.5, 0.5]))
    assert torch.equal(result.state_dict("t2")["w"], torch.tensor([2.5, 3.5, 0.5, 0.5]))
    assert result.masks["w"].dtype == torch.uint8  # bit-packed
    assert result.masks["w"].shape == (2, 1)


def test_mask_is_strict_and_threshold_may_be_per_task():
    result = run(threshold={"t1": 1.0, "t2": 0.6})
    # t1 at threshold 1: [1, 0, 2, 1] > [1, 3, 1, 1] -> [F, F, T, F] (1 > 1 is false)
    assert result.mask("t1", "w").tolist() == [False, False, True, False]
    assert result.mask("t2", "w").tolist() == [True, True, False, True]
    assert torch.equal(result.state_dict("t1")["w"], torch.tensor([0.5, 0.5, 1.5, 0.5]))
    # threshold 0: every non-zero |tau_t| is kept
    zero = run(threshold=0.0)
    assert zero.mask("t1", "w").tolist() == [True, False, True, True]
    assert zero.mask("t2", "w").tolist() == [True, True, True, True]


def test_threshold_mapping_must_name_exactly_the_tasks():
    with pytest.raises(MergeBenchError, match="tall_masks.threshold.*lacks task 't2'"):
        run(threshold={"t1": 0.5})
    with pytest.raises(MergeBenchError, match="tall_masks.threshold.*unknown task 't3'"):
        run(threshold={"t1": 0.5, "t2": 0.5, "t3": 0.5})


@pytest.fixture(scope="module")
def random_pool():
    g = torch.Generator().manual_seed(4)
    pre = {
        "embed.weight": torch.randn(200, 120, generator=g) * 0.02,  # 24,000 entries
        "block.weight": torch.randn(16, 30, generator=g),
        "block.bias": torch.zeros(30),
        # No 0-D key: `unpack_bits` cannot unpack a mask of shape () (reported; EMR too).
        "half.weight": torch.randn(9, 11, generator=g).to(torch.float16),
        "position_ids": torch.arange(6),
        "head.weight": torch.randn(3, 30, generator=g),
    }
    finetuned = {}
    for index, task in enumerate(("a", "b", "c", "d")):
        ft = {}
        for key, value in pre.items():
            if value.is_floating_point() and key != "head.weight":
                step = torch.randint(-3, 4, value.shape, generator=g).float() * 1e-2
                noise = torch.randn(value.shape, generator=g) * 1e-2 * (index % 2)
                ft[key] = (value.float() + step + noise).to(value.dtype)
            elif key == "head.weight":
                ft[key] = torch.randn(2 + index, 30, generator=g)
            else:
                ft[key] = value.clone()
        finetuned[task] = ft
    return pre, finetuned


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"base": "ties"},
        {"threshold": {"a": 0.2, "b": 0.3, "c": 0.5, "d": 0.6}},
        {"base": "ties", "threshold": {"d": 0.4, "c": 0.2, "b": 0.6, "a": 0.3}},
    ],
)
def test_streamed_merge_equals_the_reference(random_pool, params):
    """Unified vectors, masks and served weights equal the reference's (torch.equal: +0 and
    -0 compare equal; the reference builds zeros with `where`, the engine by multiplying)."""
    pre, finetuned = random_pool
    exclude = [r"head\..*"]
    result = mergebench.merge(
        "tall_masks", pre, finetuned, exclude=exclude, progress=False, **params
    )
    expected = tall_masks_reference(pre, finetuned, exclude=exclude, **params)
    assert set(result.unified) == set(expected.unified)
    for key, value in expected.unified.items():
        assert torch.equal(result.unified[key], value), key
    for task in finetuned:
        served = result.state_dict(task)
        for key in expected.unified:
            assert torch.equal(result.mask(task, key), expected.masks[task][key]), (task, key)
            assert served[key].dtype == pre[key].dtype
            assert torch.equal(served[key], expected.weights[task][key]), (task, key)
        assert torch.equal(served["head.weight"], finetuned[task]["head.weight"])
        assert torch.equal(served["position_ids"], pre["position_ids"])


def test_served_weights_are_pretrained_plus_masked_multitask_vector(random_pool):
    pre, finetuned = random_pool
    result = mergebench.merge(
        "tall_masks", pre, finetuned, exclude=[r"head\..*"], progress=False, threshold=0.4
    )
    key = "block.weight"
    total = sum(ft[key] - pre[key] for ft in finetuned.values())
    for task, ft in finetuned.items():
        tau = ft[key] - pre[key]
        mask = tau.abs() > 0.4 * (total - tau).abs()
        torch.testing.assert_close(result.state_dict(task)[key], pre[key] + mask * total)


def test_save_and_load_round_trip(random_pool, tmp_path):
    pre, finetuned = random_pool
    result = mergebench.merge(
        "tall_masks",
        pre,
        finetuned,
        exclude=[r"head\..*"],
        progress=False,
        base="ties",
        threshold={"a": 0.2, "b": 0.3, "c": 0.5, "d": 0.6},
    )
    result.save(tmp_path / "tall")
    loaded = mergebench.load_result(tmp_path / "tall")
    assert isinstance(loaded, TaskConditionedResult)
    assert loaded.method == "tall_masks"
    assert loaded.params["threshold"] == {"a": 0.2, "b": 0.3, "c": 0.5, "d": 0.6}
    for task in finetuned:
        original, again = result.state_dict(task), loaded.state_dict(task)
        assert set(original) == set(again)
        for key in original:
            assert torch.equal(original[key], again[key]), (task, key)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("base", "emr"),
        ("threshold", -0.1),
        ("threshold", math.nan),
        ("threshold", math.inf),
        ("threshold", "high"),
        ("threshold", True),
        ("threshold", {}),
        ("threshold", {"t1": 0.5, "t2": math.nan}),
    ],
)
def test_bad_options_are_errors_naming_the_option(option, value):
    with pytest.raises(MergeBenchError, match=f"tall_masks.{option}"):
        run(**{option: value})
