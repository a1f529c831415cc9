"""Hyperparameter selection on the validation split, as the papers did (never on test).

For every point of a grid (e.g. task_arithmetic `scaling` in 0.1..1.0, ties `scaling` x `k`),
merge and evaluate on the validation split; keep the point with the best validation
average; evaluate only that point on the test split. The outcome is its own leaderboard
row, `<method> (val-tuned)`, which records the grid, every validation average and the pick.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergebench.report.records import RunRecord, TaskScore, average_score, primary_scores
from mergebench.util.errors import MergeBenchError
from mergebench.util.progress import track

# (merge result, split) -> scores; the split is "validation" for every grid point and "test"
# only for the selected one.
EvaluateFn = Callable[[Any, str], list[TaskScore]]
MergeFn = Callable[[dict[str, Any]], Any]


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of `{option: [values]}` in the given order of options and values."""
    if not grid:
        raise MergeBenchError("hparam.grid: empty grid (give at least one option with values)")
    for option, values in grid.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise MergeBenchError(f"hparam.grid.{option}: expected a non-empty list of values")
    options = list(grid)
    return [dict(zip(options, point, strict=True)) for point in itertools.product(*grid.values())]


def mean_score(scores: Sequence[TaskScore]) -> float:
    """The run's average score on validation (`report.records.average_score`)."""
    if not primary_scores(scores, split=None):
        raise MergeBenchError("hparam: the evaluator returned no scores")
    return average_score(scores, split=None)


@dataclass
class Candidate:
    params: dict[str, Any]
    val_scores: list[TaskScore]
    val_average: float
    merge_seconds: float = 0.0


@dataclass
class Selection:
    method: str
    candidates: list[Candidate]
    best: Candidate
    test_scores: list[TaskScore]
    base_params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} (val-tuned)"

    def record(self, family: str, taskset: str, config: Mapping[str, Any]) -> RunRecord:
        """The leaderboard row: test scores of the pick, plus its validation scores."""
        return RunRecord(
            method=self.method,
            label=self.label,
            family=family,
            taskset=taskset,
            config={**config, "selected": dict(self.best.params)},
            scores=[*self.test_scores, *self.best.val_scores],
            merge_seconds=self.best.merge_seconds,
            extra={
                "selected": dict(self.best.params),
                "grid": [
                    {"params": c.params, "val_average": c.val_average} for c in self.candidates
                ],
            },
        )


def select_on_validation(
    method: str,
    grid: Mapping[str, Sequence[Any]],
    merge_fn: MergeFn,
    evaluate_fn: EvaluateFn,
    base_params: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Selection:
    """Grid search on validation, then one test evaluation of the best point.

    `merge_fn(params)` merges with the method's defaults overridden by `base_params` and
    then by the grid point; ties in validation average keep the earlier grid point.
    """
    import time

    base = dict(base_params or {})
    points = expand_grid(grid)
    candidates: list[Candidate] = []
    best, best_result = None, None  # keep the best merge instead of merging it again
    for point in track(points, f"{method}: validation grid", enabled=progress, unit="point"):
        params = {**base, **point}
        start = time.perf_counter()
        result = merge_fn(params)
        seconds = time.perf_counter() - start
        scores = evaluate_fn(result, "validation")
        if any(s.split != "validation" for s in scores):
            raise MergeBenchError("hparam: the evaluator returned non-validation scores")
        candidate = Candidate(params, scores, mean_score(scores), seconds)
        candidates.append(candidate)
        if best is None or candidate.val_average > best.val_average:  # ties keep the first
            best, best_result = candidate, result
        del result
    assert best is not None  # expand_grid never returns an empty list
    test_scores = evaluate_fn(best_result, "test")
    return Selection(method, candidates, best, test_scores, base)
