"""The common evaluator: one loop for every method, reference row and family.

For each task: load `result.state_dict(task)` into one reused model with that task's head
shape, run the split in batches under inference mode, and compute the task's torchmetrics
metric. Anything with `state_dict(task)` can be evaluated: a `MergeResult` (single model or
task-conditioned alike), the zoo's reference rows, a user's own object.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric

from mergebench.data.lm_eval import SampleScores
from mergebench.data.metrics import ScoredTask
from mergebench.engine.pool import Batch
from mergebench.report.records import TaskScore, average_score, primary_scores
from mergebench.report.stats import Outcome
from mergebench.results import TaskConditionedResult
from mergebench.results.switching import TaskSwitcher
from mergebench.util.progress import on_terminal, track


class PerTaskModels(Protocol):
    def state_dict(self, task: str) -> dict[str, torch.Tensor]: ...


class EvalFamily(Protocol):
    """What the evaluator needs of a model family."""

    eval_batch_size: int

    def build_model(self, task: str) -> nn.Module: ...

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...


class EvalData(Protocol):
    """The evaluator's side of a task set: labeled batches and metrics. Implemented by
    `LabeledData` (embedded sets) and `HFLabeledData` (Hugging Face data sets);
    `tests/evaluation/test_evaluation_protocol.py` holds both to these signatures."""

    family: EvalFamily

    @property
    def tasks(self) -> list[str]: ...

    def num_classes(self, task: str) -> int: ...

    def num_examples(self, task: str, split: str) -> int: ...

    def metric(self, task: str) -> Metric: ...

    def metric_name(self, task: str) -> str: ...

    def indexed_batches(
        self,
        task: str,
        split: str,
        batch_size: int,
        order: np.ndarray | None = None,
        by_length: bool = False,
    ) -> Iterator[tuple[Batch, torch.Tensor, np.ndarray]]: ...


@runtime_checkable
class SampleScoredData(Protocol):
    """A task set scored by its own harness (lm-eval: `families.causal_lm.LMEvalData`): per
    task the harness's score and each example's value; None where `result` has no model."""

    def sample_scores(
        self, result: Any, task: str, split: str, batch_size: int
    ) -> SampleScores | None: ...


def _harness_outcome(
    data: SampleScoredData, result: Any, task: str, split: str, batch_size: int
) -> tuple[TaskScore, Outcome] | None:
    scored = data.sample_scores(result, task, split, batch_size)
    if scored is None:
        return None
    n = len(scored.samples)
    score = TaskScore(task=task, metric=scored.metric, value=scored.value, split=split)
    return score, Outcome("mean", scored.samples, np.zeros(n, dtype=np.int64), 1)


@dataclass(frozen=True)
class Evaluation:
    scores: list[TaskScore]
    seconds: float
    examples: int
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")


class ModelCache:
    """One runnable model per head shape of a family, reused across tasks and runs."""

    def __init__(self, data: EvalData) -> None:
        self.data = data
        self._models: dict[object, nn.Module] = {}
        self._switchers: dict[object, TaskSwitcher] = {}

    def _key(self, task: str) -> object:
        """What makes two tasks' models the same shape: their class count, or the family's
        own `model_shape(task)` where its tasks have different architectures (BEiT-3)."""
        shape = getattr(self.data.family, "model_shape", None)
        return shape(task) if shape is not None else self.data.num_classes(task)

    def _model(self, task: str) -> nn.Module:
        key = self._key(task)
        if key not in self._models:
            self._models[key] = self.data.family.build_model(task).eval()
        return self._models[key]

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
        key = self._key(task)
        switcher = self._switchers.get(key)
        if switcher is None or switcher.result is not result:
            switcher = self._switchers[key] = TaskSwitcher(result, model)
        return switcher.switch(task)


class OwnScoring(Protocol):
    """Task data that scores a model itself (generation, retrieval, several metrics per task:
    the BEiT-3 tasks): its metrics, primary first, and per-example outcomes to resample."""

    def score_task(
        self, model: nn.Module, task: str, split: str, batch_size: int
    ) -> ScoredTask: ...


def score_task_outcome(
    model: nn.Module, data: EvalData, task: str, split: str, batch_size: int
) -> tuple[list[TaskScore], Outcome]:
    """Every score of one task (primary first) and its outcome."""
    own = getattr(data, "score_task", None)
    if own is not None:
        model.eval()
        with torch.inference_mode():
            scored: ScoredTask = own(model, task, split, batch_size)
        scores = [TaskScore(task, name, v, split) for name, v in scored.values.items()]
        return scores, Outcome(scored.per_example, scored.pred, scored.label, scored.classes)
    score, outcome = score_model_outcome(model, data, task, split, batch_size)
    return [score], outcome


def score_model_outcome(
    model: nn.Module, data: EvalData, task: str, split: str, batch_size: int
) -> tuple[TaskScore, Outcome]:
    """The task's metric of `model` on one split, and every example's prediction (the model
    is put in eval mode)."""
    model.eval()
    metric = data.metric(task)
    n = data.num_examples(task, split)
    classes = data.num_classes(task)
    regression = classes == 1
    pred = np.zeros(n, dtype=np.float32 if regression else np.int64)
    label = np.zeros(n, dtype=np.float32 if regression else np.int64)
    seen = 0
    with torch.inference_mode():
        for batch, labels, idx in data.indexed_batches(task, split, batch_size, by_length=True):
            logits = data.family.logits(model, batch)
            metric.update(logits, labels)
            pred[idx] = (logits.reshape(-1) if regression else logits.argmax(dim=-1)).numpy()
            label[idx] = labels.numpy()
            seen += len(labels)
    value = float(metric.compute()) if seen else float("nan")
    name = data.metric_name(task)
    score = TaskScore(task=task, metric=name, value=value, split=split)
    return score, Outcome(name, pred[:seen], label[:seen], classes)


def score_model(
    model: nn.Module, data: EvalData, task: str, split: str, batch_size: int
) -> tuple[TaskScore, int]:
    """The task's metric of `model` on one split (the model is put in eval mode)."""
    score, outcome = score_model_outcome(model, data, task, split, batch_size)
    return score, len(outcome.label)


def evaluate_timed(
    result: PerTaskModels,
    data: EvalData,
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
    scores, outcomes, total, start = [], {}, 0, time.perf_counter()
    for task in track(names, "evaluating", enabled=progress and on_terminal(), unit="task"):
        began = time.perf_counter()
        if isinstance(data, SampleScoredData):
            scored = _harness_outcome(data, result, task, split, batch_size)
            if scored is None:  # a reference row without a model for this task
                continue
            score, outcome = scored
            scores.append(score)
        else:
            model = cache.model_with(task, result)
            task_scores, outcome = score_task_outcome(model, data, task, split, batch_size)
            score = task_scores[0]
            scores.extend(task_scores)
        outcomes[task] = outcome
        total += len(outcome.label)
        if progress and not on_terminal():  # logs: one plain line per task
            print(f"evaluated {task} ({split}): {score.metric} {score.value:.4f}, "
                  f"{len(outcome.label)} examples in {time.perf_counter() - began:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    seconds = time.perf_counter() - start
    return Evaluation(scores=scores, seconds=seconds, examples=total, outcomes=outcomes)


def evaluate(
    result: PerTaskModels,
    data: EvalData,
    tasks: Sequence[str] | None = None,
    split: str = "test",
) -> list[TaskScore]:
    """Per-task scores of `result` (see `evaluate_timed` for throughput)."""
    return evaluate_timed(result, data, tasks, split).scores


def average(scores: Sequence[TaskScore]) -> float:
    """The run's average score (`mergebench.report.records.average_score`, any split)."""
    return average_score(scores, split=None)


def normalized_average(scores: Sequence[TaskScore], individual: Sequence[TaskScore]) -> float:
    """Mean over tasks of method / individual (the paper's normalized score)."""
    ref = primary_scores(individual, split=None)
    ratios = [v / ref[t] for t, v in primary_scores(scores, split=None).items() if ref.get(t)]
    return sum(ratios) / len(ratios) if ratios else float("nan")
