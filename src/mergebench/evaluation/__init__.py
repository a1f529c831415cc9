"""The common evaluator: one loop for every method, reference row and family.

For each task: load `result.state_dict(task)` into one reused model with that task's head
shape, run the split in batches under inference mode, and compute the task's torchmetrics
metric. Anything with `state_dict(task)` can be evaluated: a `MergeResult` (single model or
task-conditioned alike), the zoo's reference rows, a user's own object.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from mergebench.families.labeled import LabeledData
from mergebench.report.records import TaskScore
from mergebench.results import TaskConditionedResult
from mergebench.results.switching import TaskSwitcher


class PerTaskModels(Protocol):
    def state_dict(self, task: str) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Evaluation:
    scores: list[TaskScore]
    seconds: float
    examples: int

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")


class ModelCache:
    """One runnable model per head shape of a family, reused across tasks and runs."""

    def __init__(self, data: LabeledData) -> None:
        self.data = data
        self._models: dict[int, nn.Module] = {}
        self._switchers: dict[int, TaskSwitcher] = {}

    def _model(self, task: str) -> nn.Module:
        classes = self.data.num_classes(task)
        if classes not in self._models:
            self._models[classes] = self.data.family.build_model(task).eval()
        return self._models[classes]

    def model_for(self, task: str, state: dict[str, torch.Tensor]) -> nn.Module:
        model = self._model(task)
        model.load_state_dict(state, strict=True)
        return model

    def model_with(self, task: str, result: PerTaskModels) -> nn.Module:
        """The model for `task` holding `result`'s weights. A task-conditioned result is
        switched in place (`TaskSwitcher`, bit-identical, no state dict materialized)."""
        if not isinstance(result, TaskConditionedResult):
            return self.model_for(task, result.state_dict(task))
        model = self._model(task)
        classes = self.data.num_classes(task)
        switcher = self._switchers.get(classes)
        if switcher is None or switcher.result is not result:
            switcher = self._switchers[classes] = TaskSwitcher(result, model)
        return switcher.switch(task)


def score_model(
    model: nn.Module, data: LabeledData, task: str, split: str, batch_size: int
) -> tuple[TaskScore, int]:
    """The task's metric of `model` on one split (the model is put in eval mode)."""
    model.eval()
    metric = data.metric(task)
    n = 0
    with torch.inference_mode():
        for batch, labels in data.batches(task, split, batch_size, by_length=True):
            metric.update(data.family.logits(model, batch), labels)
            n += len(labels)
    value = float(metric.compute()) if n else float("nan")
    return TaskScore(task=task, metric=data.metric_name(task), value=value, split=split), n


def evaluate_timed(
    result: PerTaskModels,
    data: LabeledData,
    tasks: Sequence[str] | None = None,
    split: str = "test",
    batch_size: int | None = None,
    cache: ModelCache | None = None,
    progress: bool = False,
) -> Evaluation:
    """Scores of `result` on every task, with wall time and examples/second."""
    cache = cache or ModelCache(data)
    batch_size = batch_size or data.family.eval_batch_size
    names: Iterable[str] = tasks if tasks is not None else data.tasks
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(list(names), desc="evaluating", unit="task", leave=False)
    scores, total, start = [], 0, time.perf_counter()
    for task in names:
        model = cache.model_with(task, result)
        score, n = score_model(model, data, task, split, batch_size)
        scores.append(score)
        total += n
    return Evaluation(scores=scores, seconds=time.perf_counter() - start, examples=total)


def evaluate(
    result: PerTaskModels,
    data: LabeledData,
    tasks: Sequence[str] | None = None,
    split: str = "test",
) -> list[TaskScore]:
    """Per-task scores of `result` (see `evaluate_timed` for throughput)."""
    return evaluate_timed(result, data, tasks, split).scores


def average(scores: Sequence[TaskScore]) -> float:
    return sum(s.value for s in scores) / len(scores) if scores else float("nan")


def normalized_average(scores: Sequence[TaskScore], individual: Sequence[TaskScore]) -> float:
    """Mean over tasks of method / individual (the paper's normalized score)."""
    ref = {s.task: s.value for s in individual}
    ratios = [s.value / ref[s.task] for s in scores if ref.get(s.task)]
    return sum(ratios) / len(ratios) if ratios else float("nan")
