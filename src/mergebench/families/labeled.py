"""Inputs with labels: the zoo trainer's and the evaluator's accessor, never a method's.

`LabeledData` serves the embedded sets (in-memory splits), `HFLabeledData` Hugging Face data
sets (read lazily). Both encode inputs with their family, so the evaluator needs nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torchmetrics import Metric

from mergebench.data.embedded import TaskSplits, get_task
from mergebench.data.hf import DataSpec, Examples, split_rows
from mergebench.data.hf_labels import check_class_count, fingerprint, read_labels
from mergebench.data.metrics import build_metric, build_task_metric
from mergebench.engine.pool import Batch
from mergebench.families.base import Family
from mergebench.util.errors import MergeBenchError


class LabeledData:
    """Inputs with labels, for fine-tuning the zoo and for the evaluator; never given to methods."""

    def __init__(self, family: Family, splits: dict[str, TaskSplits]) -> None:
        self.family = family
        self._splits = splits

    @property
    def tasks(self) -> list[str]:
        return list(self._splits)

    def splits(self, task: str) -> TaskSplits:
        if task not in self._splits:
            raise MergeBenchError(f"task {task!r} is not in this task set ({self.tasks})")
        return self._splits[task]

    def num_examples(self, task: str, split: str) -> int:
        return len(self.splits(task).split(split))

    def num_classes(self, task: str) -> int:
        return len(self.splits(task).classes)

    def fingerprint(self, task: str) -> str:
        return self.splits(task).fingerprint

    def metric_name(self, task: str) -> str:
        return get_task(task).metric

    def metric(self, task: str) -> Metric:
        return build_metric(self.metric_name(task), self.num_classes(task))

    def batches(
        self,
        task: str,
        split: str,
        batch_size: int,
        order: np.ndarray | None = None,
        by_length: bool = False,
    ) -> Iterator[tuple[Batch, torch.Tensor]]:
        """(encoded inputs, labels) batches of one split, in `order` if given. `by_length`
        groups texts of similar length (less padding: evaluation only, order-free metrics)."""
        for batch, labels, _ in self.indexed_batches(task, split, batch_size, order, by_length):
            yield batch, labels

    def indexed_batches(
        self,
        task: str,
        split: str,
        batch_size: int,
        order: np.ndarray | None = None,
        by_length: bool = False,
    ) -> Iterator[tuple[Batch, torch.Tensor, np.ndarray]]:
        """`batches`, plus each batch's example indices in the split (the evaluator puts
        predictions back in the data set's order with them)."""
        part = self.splits(task).split(split)
        index = np.arange(len(part)) if order is None else order
        if by_length and isinstance(part.inputs, list):
            index = index[np.argsort([len(part.inputs[i]) for i in index], kind="stable")]
        for start in range(0, len(index), batch_size):
            idx = index[start : start + batch_size]
            if isinstance(part.inputs, list):
                raw = [part.inputs[i] for i in idx]
            else:
                raw = part.inputs[idx]
            labels = torch.as_tensor(part.labels[idx], dtype=torch.long)
            yield self.family.encode(raw), labels, idx


class HFLabeledData(LabeledData):
    """`LabeledData` over Hugging Face data sets: what the evaluator uses, never a method."""

    def __init__(
        self, family: Family, specs: Mapping[str, DataSpec], seed: int, examples: Examples
    ) -> None:
        super().__init__(family, {})
        self._specs = dict(specs)
        self._seed = seed
        self._examples = examples

    @property
    def tasks(self) -> list[str]:
        return list(self._specs)

    def spec(self, task: str) -> DataSpec:
        if task not in self._specs:
            raise MergeBenchError(f"task {task!r} is not in this task set ({self.tasks})")
        return self._specs[task]

    def splits(self, task: str):  # the zoo's in-memory splits do not exist here
        raise MergeBenchError(
            f"task {task!r}: a Hugging Face data set is read lazily; use batches() or labels()"
        )

    def labels(self, task: str, split: str) -> np.ndarray:
        spec = self.spec(task)
        labels = read_labels(spec, split, self._seed, self._examples)
        if not spec.regression:
            classes = self.num_classes(task)
            check_class_count(spec, classes)
            if len(labels) and labels.max() >= classes:
                raise MergeBenchError(
                    f"{spec.where}: {spec.label_text} has label {int(labels.max())}, but the task "
                    f"has {classes} classes"
                )
        return labels

    def num_examples(self, task: str, split: str) -> int:
        return len(split_rows(self.spec(task), split, self._seed, self._examples)[1])

    def num_classes(self, task: str) -> int:
        return self.family.tasks[task].num_classes

    def fingerprint(self, task: str) -> str:
        return fingerprint(self.spec(task), self._seed, self._examples)

    def metric_name(self, task: str) -> str:
        return self.spec(task).metric

    def metric(self, task: str) -> Metric:
        return build_task_metric(self.metric_name(task), self.num_classes(task))

    def indexed_batches(
        self,
        task: str,
        split: str,
        batch_size: int,
        order: np.ndarray | None = None,
        by_length: bool = False,
    ) -> Iterator[tuple[Batch, torch.Tensor, np.ndarray]]:
        del by_length  # rows are read lazily: sorting them by length would read every row
        inputs = self.family.tasks[task].inputs[split]
        labels = torch.as_tensor(self.labels(task, split))
        index = np.arange(len(labels)) if order is None else np.asarray(order)
        for start in range(0, len(index), batch_size):
            idx = index[start : start + batch_size]
            yield self.family.encode(inputs[idx]), labels[idx], idx


__all__ = ["HFLabeledData", "LabeledData"]
