"""The zoo's reference rows (individual, pretrained, multitask) as the evaluator sees them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergebench.families.base import head_keys
from mergebench.util.errors import MergeBenchError


class ZooModels:
    """A per-task view of zoo checkpoints with the evaluator's interface, `state_dict(task)`."""

    def __init__(self, kind: str, directory: Path, tasks: Sequence[str], taskset: str = "") -> None:
        self.kind, self.directory, self.tasks, self.taskset = (
            kind,
            Path(directory),
            list(tasks),
            taskset,
        )
        self._shared: dict[str, torch.Tensor] | None = None

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        if not path.exists():
            raise MergeBenchError(f"{path}: zoo checkpoint missing (build it with mergebench-zoo)")
        return load_file(str(path))

    def state_dict(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self.tasks:
            raise MergeBenchError(f"task {task!r} is not in this zoo ({self.tasks})")
        own = self._load(self.directory / f"{task}.safetensors")
        if self.kind == "individual":
            return own
        if self.kind == "pretrained":  # the packaged backbone with the task's own head
            if self._shared is None:
                self._shared = self._load(self.directory / "pretrained.safetensors")
            return {**self._shared, **head_keys(own)}
        if self.kind == "multitask":
            folder = self.directory / "multitask" / self.taskset
            if self._shared is None:
                self._shared = self._load(folder / "backbone.safetensors")
            return {**self._shared, **self._load(folder / "heads" / f"{task}.safetensors")}
        raise MergeBenchError(
            f"reference row {self.kind!r}: unknown (individual, pretrained, multitask)"
        )
