"""What every model family shares (per-task heads, label-free data views), and what the
embedded zoo's training adds.

`Family` is the base of all families: the `mergebench.engine.pool.TaskFamily` a merging method
sees, plus the `kind` a task set names in `family:`. `ZooFamily(Family)` adds the hooks the
zoo's fine-tuning calls (packaged pretrained weights, training mode, a fresh head); families
with configured checkpoints derive from `mergebench.families.paper.PaperFamily(Family)`.

A family holds the *inputs* of every split of every task and nothing else: labels stay in
`LabeledData`, which is not part of `mergebench.engine.pool.TaskFamily`, so a merging method that
receives the pool cannot read a label, test or otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergebench.data.embedded import SPLITS, TaskSplits
from mergebench.engine.pool import Batch
from mergebench.util.errors import MergeBenchError

HEAD = "classifier"  # every family names its task head module so; exclude regex `classifier\..*`


@dataclass(frozen=True)
class TaskInputs:
    """Label-free view of one task: number of classes and the inputs of each split."""

    num_classes: int
    inputs: dict[str, Sequence[Any]]  # split -> list[str] or uint8 image array


class Family:
    """Base of every model family. Subclasses define `encode` and `_new_model`."""

    name: str = "family"
    # What a task set names in `family:` to say it is made for this family (its data's form).
    kind: str = ""
    modality: str = ""

    def __init__(self, tasks: dict[str, TaskInputs], eval_batch_size: int = 64) -> None:
        self.tasks = tasks
        self.eval_batch_size = eval_batch_size

    # -- what subclasses provide ----------------------------------------------------------
    def encode(self, inputs: Sequence[Any]) -> Batch:
        """Raw inputs (texts / uint8 images) to the model's input tensors."""
        raise NotImplementedError

    def _new_model(self, num_classes: int) -> nn.Module:
        """A model with random weights whose task head has `num_classes` outputs."""
        raise NotImplementedError

    # -- pairing with a task set --------------------------------------------------------------
    @classmethod
    def check_taskset(cls, cfg_model: Mapping[str, Any], cfg_taskset: Mapping[str, Any]) -> None:
        """A task set names the family kind it is made for (`taskset.family`), or only the
        form of its inputs (`text`, `image`: a task set of one's own files)."""
        wanted = cfg_taskset.get("family")
        if wanted is None:
            raise MergeBenchError("taskset.family: missing")
        if wanted not in (cls.kind, cls.modality):
            raise MergeBenchError(
                f"taskset.family: task set {cfg_taskset.get('name')!r} is for {wanted!r}, "
                f"not for model {cfg_model.get('name')!r} (a {cls.kind!r} family)"
            )

    # -- TaskFamily ------------------------------------------------------------------------
    def _task(self, task: str) -> TaskInputs:
        if task not in self.tasks:
            raise MergeBenchError(
                f"task {task!r} is not in family {self.name!r} (tasks: {', '.join(self.tasks)})"
            )
        return self.tasks[task]

    def build_model(self, task: str) -> nn.Module:
        return self._new_model(self._task(task).num_classes)

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**batch)

    def unlabeled_inputs(
        self, task: str, split: str, max_examples: int | None, batch_size: int
    ) -> Iterator[Batch]:
        if split not in SPLITS:
            raise MergeBenchError(f"split: unknown split {split!r} (choose from {SPLITS})")
        inputs = self._task(task).inputs[split]
        n = len(inputs) if max_examples is None else min(max_examples, len(inputs))
        for start in range(0, n, batch_size):
            yield self.encode(inputs[start : min(start + batch_size, n)])


class ZooFamily(Family):
    """A family the zoo fine-tunes from packaged weights: `pretrained_state` gives them, and
    the task head is the module `classifier`."""

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        """The packaged pretrained weights in this family's key names, head excluded."""
        raise NotImplementedError

    def set_train_mode(self, model: nn.Module, multitask: bool = False) -> None:
        """Training mode for fine-tuning (the CNN keeps BatchNorm statistics frozen)."""
        model.train()

    def new_finetuning_model(self, task: str) -> nn.Module:
        """Pretrained backbone plus a freshly initialised head (seed the global RNG first)."""
        model = self.build_model(task)
        missing, unexpected = model.load_state_dict(self.pretrained_state(), strict=False)
        if unexpected or any(not k.startswith(HEAD + ".") for k in missing):
            raise MergeBenchError(
                f"{self.name}: pretrained weights do not fit the model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return model

    @staticmethod
    def share_backbone(source: nn.Module, target: nn.Module) -> None:
        """Make `target` use `source`'s modules, and its own parameters and buffers (a ViT's
        class token and position table sit on the model itself), for everything but the head
        (multi-task model)."""
        for name, child in source.named_children():
            if name != HEAD:
                setattr(target, name, child)
        for name, param in source.named_parameters(recurse=False):
            setattr(target, name, param)
        for name, buffer in source.named_buffers(recurse=False):
            target._buffers[name] = buffer


def model_folder(path: Path) -> Path:
    """The folder holding a checkpoint's config and tokenizer files."""
    return path if path.is_dir() else path.parent


def head_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(HEAD + ".")}


def task_inputs(splits: TaskSplits) -> TaskInputs:
    """The label-free view handed to a family."""
    return TaskInputs(
        num_classes=len(splits.classes),
        inputs={name: splits.split(name).inputs for name in SPLITS},
    )


__all__ = ["HEAD", "Family", "TaskInputs", "ZooFamily", "head_keys", "model_folder", "task_inputs"]
