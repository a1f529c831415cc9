"""The selection protocol: options chosen on validation, structure used where exact."""

from __future__ import annotations

import pytest
import torch

import mergebench
from mergebench.bench.protocol import searchable, select
from mergebench.engine.pool import ModelPool
from mergebench.report.records import TaskScore


@pytest.fixture
def pool():
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(64, generator=g), "b": torch.randn(8, generator=g)}
    finetuned = {
        t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        for t in ("a", "b", "c")
    }
    return ModelPool.from_checkpoints(pre, finetuned)


def closeness_to(target: dict[str, torch.Tensor]):
    """A validation 'score' that peaks where the merged weights equal `target`."""
    calls = []

    def validate(result):
        state = result.state_dict("a")
        distance = sum(float((state[k] - v).norm()) for k, v in target.items())
        calls.append(distance)
        return [TaskScore(t, "accuracy", 1.0 / (1.0 + distance), "validation") for t in "abc"]

    validate.calls = calls
    return validate


def test_task_arithmetic_scaling_selected_with_one_merge(pool):
    target = mergebench.merge_pool("task_arithmetic", pool, progress=False, scaling=0.4)
    validate = closeness_to(target.state_dict("a"))
    selection = select("task_arithmetic", {"scaling": 0.3}, pool, validate)
    assert selection.selected == {"scaling": 0.4}
    assert selection.merges == 1  # scaling is a post-multiplier: one merge serves the grid
    assert len(selection.candidates) == len(validate.calls) == 10
    assert [c["params"]["scaling"] for c in selection.candidates][:3] == [0.1, 0.2, 0.3]


def test_rescaled_merge_matches_a_direct_merge(pool):
    from mergebench.bench.protocol import _Rescaled
    from mergebench.engine.keyplan import plan_keys

    at_one = mergebench.merge_pool("ties", pool, progress=False, scaling=1.0)
    direct = mergebench.merge_pool("ties", pool, progress=False, scaling=0.7)
    scaled = _Rescaled(at_one, pool, plan_keys(pool).merged).at(0.7)
    for key, value in direct.state_dict("a").items():
        assert torch.allclose(scaled.state_dict("a")[key], value, atol=1e-6), key


def test_ties_searches_k_times_scaling_with_one_merge_per_k(pool):
    target = mergebench.merge_pool("ties", pool, progress=False, k=0.3, scaling=0.7)
    selection = select("ties", {}, pool, closeness_to(target.state_dict("a")))
    assert selection.selected == {"k": 0.3, "scaling": 0.7}
    assert selection.merges == 3 and len(selection.candidates) == 15


def test_options_the_user_set_are_fixed_not_searched():
    grid, per_task = searchable("ties", {"k": 0.1, "scaling": 0.3})
    assert grid == {"scaling": [0.1, 0.3, 0.5, 0.7, 1.0]}  # k is fixed
    assert searchable("task_arithmetic", {"scaling": 0.5}) == ({}, {})
    assert searchable("emr", {}) == ({}, {})  # tuning-free


def test_tall_masks_pick_each_tasks_threshold_by_its_own_score(pool):
    # Task a scores best at 0.4, task b at 0.2, task c is flat (the first value wins).
    def validate(result):
        threshold = result.params["threshold"]
        return [
            TaskScore("a", "accuracy", 1 - abs(threshold - 0.4), "validation"),
            TaskScore("b", "accuracy", 1 - abs(threshold - 0.2), "validation"),
            TaskScore("c", "accuracy", 0.5, "validation"),
        ]

    selection = select("tall_masks", {}, pool, validate)
    assert selection.selected == {"threshold": {"a": 0.4, "b": 0.2, "c": 0.2}}
    assert selection.merges == 5


def test_mask_rescale_takes_its_base_methods_selection(pool):
    target = mergebench.merge_pool("ties", pool, progress=False, k=0.1, scaling=1.0)
    validate = closeness_to(target.state_dict("a"))
    memo: dict = {}
    selection = select("mask_rescale", {"base": "ties", "base_params": None}, pool, validate,
                       memo=memo)  # fmt: skip
    assert selection.selected == {"base_params": {"k": 0.1, "scaling": 1.0}}
    # The base's selection is kept: `ties` itself is not searched again.
    calls = len(validate.calls)
    assert select("ties", {}, pool, validate, memo=memo).selected == {"k": 0.1, "scaling": 1.0}
    assert len(validate.calls) == calls
