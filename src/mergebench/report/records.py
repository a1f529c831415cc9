"""Plain records passed from the evaluator to the runs store, leaderboards and W&B."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Rows that are not merges: the upper and lower references every board shows first
# (`expert`: one expert on every task, LLM task sets; its rows are labeled `expert:<name>`).
REFERENCE_ROWS = ("individual", "multitask", "pretrained", "expert")


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task on the test split (e.g. accuracy 0.913)."""

    task: str
    metric: str
    value: float
    split: str = "test"


@dataclass
class RunRecord:
    """Everything one run (one method or reference row on one family/task set) produced.

    `method` is the registry name (`emr`, `ties`, ... or a reference row: `individual`,
    `pretrained`, `multitask`); `label` is the leaderboard row name of the variant
    (e.g. `emr`, `emr w/o mask`, `ties w/ M&R`); `config` is the fully resolved config.
    """

    method: str
    label: str
    family: str
    taskset: str
    config: dict[str, Any]
    scores: list[TaskScore]
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    peak_rss_bytes: int = 0
    artifact_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def primary_scores(scores: Sequence[TaskScore], split: str | None = "test") -> dict[str, float]:
    """Each task's primary score: its first reported metric on `split` (None: any split).

    The one definition of "a task's score" for tables, W&B and hyperparameter selection."""
    primary: dict[str, float] = {}
    for s in scores:
        if split is None or s.split == split:
            primary.setdefault(s.task, s.value)
    return primary


def average_score(scores: Sequence[TaskScore], split: str | None = "test") -> float:
    """The run's average: the mean over tasks of their primary scores (nan if none)."""
    primary = primary_scores(scores, split)
    return sum(primary.values()) / len(primary) if primary else float("nan")
