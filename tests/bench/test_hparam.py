"""Validation-split hyperparameter selection: picks on validation, touches test once."""

from __future__ import annotations

import pytest
import torch

from mergebench.api import merge_pool
from mergebench.bench.selection import expand_grid, select_on_validation
from mergebench.engine.pool import ModelPool
from mergebench.report.records import TaskScore
from mergebench.util.errors import MergeBenchError


def test_expand_grid() -> None:
    assert expand_grid({"scaling": [0.1, 0.2], "k": [0.5]}) == [
        {"scaling": 0.1, "k": 0.5},
        {"scaling": 0.2, "k": 0.5},
    ]
    with pytest.raises(MergeBenchError, match="hparam.grid.k"):
        expand_grid({"k": []})
    with pytest.raises(MergeBenchError, match="hparam.grid.k"):
        expand_grid({"k": "0.1"})
    with pytest.raises(MergeBenchError, match="empty grid"):
        expand_grid({})


@pytest.fixture
def pool() -> ModelPool:
    # W_pre = 0, tau_a = [1, 0], tau_b = [0, 1]: task arithmetic gives w = scaling * [1, 1]
    return ModelPool.from_checkpoints(
        {"w": torch.zeros(2)},
        {"a": {"w": torch.tensor([1.0, 0.0])}, "b": {"w": torch.tensor([0.0, 1.0])}},
    )


class FakeEvaluator:
    """Validation prefers w near 0.6 per entry, test prefers 1.0: the pick must follow
    validation. Every call is logged."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def __call__(self, result, split: str) -> list[TaskScore]:
        scores = []
        for i, task in enumerate(result.tasks):
            w = float(result.state_dict(task)["w"][i])
            target = 0.6 if split == "validation" else 1.0
            scores.append(TaskScore(task, "accuracy", 1.0 - abs(w - target), split=split))
        self.calls.append((split, round(float(result.state_dict("a")["w"][0]), 6)))
        return scores


def test_selects_on_validation_and_tests_once(pool) -> None:
    evaluator = FakeEvaluator()
    grid = {"scaling": [0.2, 0.4, 0.6, 0.8, 1.0]}
    sel = select_on_validation(
        "task_arithmetic",
        grid,
        merge_fn=lambda params: merge_pool("task_arithmetic", pool, progress=False, **params),
        evaluate_fn=evaluator,
        progress=False,
    )
    assert sel.best.params == {"scaling": 0.6}
    assert [c.val_average for c in sel.candidates] == pytest.approx([0.6, 0.8, 1.0, 0.8, 0.6])
    # validation for every grid point, then test exactly once, on the selected model
    assert [c[0] for c in evaluator.calls] == ["validation"] * 5 + ["test"]
    assert evaluator.calls[-1] == ("test", 0.6)
    assert [s.value for s in sel.test_scores] == pytest.approx([0.6, 0.6])

    rec = sel.record("tiny", "two", {"method": {"name": "task_arithmetic"}})
    assert rec.label == "task_arithmetic (val-tuned)"
    assert {s.split for s in rec.scores} == {"test", "validation"}
    assert rec.extra["selected"] == {"scaling": 0.6}
    assert len(rec.extra["grid"]) == 5 and rec.config["selected"] == {"scaling": 0.6}


def test_ties_two_dimensional_grid_with_base_params(pool) -> None:
    seen = []

    def merge_fn(params):
        seen.append(params)
        return merge_pool("ties", pool, progress=False, **params)

    sel = select_on_validation(
        "ties",
        {"scaling": [0.3, 0.6], "k": [0.5, 1.0]},
        merge_fn,
        FakeEvaluator(),
        base_params={"aggregate": "sum"},
        progress=False,
    )
    assert len(sel.candidates) == 4
    assert all(p["aggregate"] == "sum" for p in seen)
    assert sel.best.params["scaling"] == 0.6


def test_evaluator_must_answer_with_validation_scores(pool) -> None:
    def wrong(result, split):
        return [TaskScore("a", "accuracy", 1.0, split="test")]

    with pytest.raises(MergeBenchError, match="non-validation"):
        select_on_validation(
            "task_arithmetic",
            {"scaling": [0.5]},
            lambda p: merge_pool("task_arithmetic", pool, progress=False, **p),
            wrong,
            progress=False,
        )
