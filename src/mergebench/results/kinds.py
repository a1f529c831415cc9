"""Merge results: one merged model, or task-conditioned (a unified vector plus per-task modulators).

Both answer `state_dict(task)`, so the evaluator never needs to know which kind it holds.

On disk (a folder, written atomically), each part a set of safetensors shards with a Hugging
Face index (`<part>.safetensors` when one shard holds it, else `<part>-00001-of-0000n`, and
`<part>.safetensors.index.json`; see `shards.py`):
- single model: `model` (the full shared state dict) and, when tasks have their own heads,
  `task_specific` (keys `"<task index>::<key>"`);
- task-conditioned: `unified` (float32 `tau_uni` per merged key), `masks` (uint8
  `[N, ceil(numel/8)]` per key, 8 entries per byte; absent when masks are off), `copied`
  (non-float keys), `task_specific`, and the pretrained weights by reference (path, and
  a sha256 digest of the tensors the deltas apply to, checked on load) or, for an
  in-memory pretrained model, `pretrained`;
- both: `result.json` (method, parameters, tasks, rescalers, version) with, since format
  version 2, a manifest (sha256 and size of every file written) and a checksum of its own
  content (`artifact.py`); `load_result` (`loading.py`) refuses a folder whose files or
  `result.json` changed since.

Tensors are written one at a time (`shards.ShardedWriter`) and loaded lazily
(`shards.LazyTensors`): saving or loading a result holds a few tensors, not a model. Where a
save may write, and what it replaces, is `publish.py`'s policy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.bits import unpack_bits
from mergebench.engine.checkpoints import TensorReader
from mergebench.results.artifact import (
    FORMAT,
    FORMAT_VERSION,
    SEP,
    check_rescalers,
    pretrained_digest,
)
from mergebench.results.publish import output_dir, publish_result
from mergebench.results.shards import (
    DEFAULT_SHARD_BYTES,
    Entry,
    entries_of,
    parse_size,
    shape_of,
    write_tensors,
)
from mergebench.results.tied import add_tied_keys
from mergebench.util.errors import MergeBenchError
from mergebench.util.version import __version__


class MergeResult:
    """Common interface of merge results."""

    kind: str
    method: str
    params: dict[str, Any]
    tasks: list[str]
    extra: dict[str, Any]

    def state_dict(self, task: str | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save(self, directory: str | Path, shard_size: int | str = DEFAULT_SHARD_BYTES) -> Path:
        """Write the result into `directory` atomically, tensor by tensor, in shards of at
        most `shard_size` (bytes, or `"2GB"`, `"500MiB"`)."""
        shard_bytes = parse_size(shard_size)

        def write(tmp: Path) -> Callable[[], dict[str, Any]]:
            self.write_tensors(tmp, shard_bytes)
            return self.describe

        return publish_result(output_dir(directory), write, self.input_files())

    def input_files(self) -> list[Path]:
        """Files this result still reads (an artifact it was loaded from, the pretrained
        checkpoint it references): a save must not replace them."""
        found: list[Path] = []

        def visit(value: Any, depth: int) -> None:
            files = getattr(value, "files", None)
            if callable(files):  # a checkpoint source or lazily read tensors
                found.extend(files())
            elif isinstance(value, Mapping) and depth < 2:  # task_specific: task -> tensors
                for item in value.values():
                    visit(item, depth + 1)

        for value in vars(self).values():
            visit(value, 0)
        return found

    def write_tensors(
        self, folder: Path, shard_bytes: int, done: frozenset[str] | set[str] = frozenset()
    ) -> None:
        """Write every tensor part not in `done` (parts a streamed merge already wrote)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """`result.json`'s content (the manifest is added when the files are complete)."""
        return self._metadata()

    def _check_task(self, task: str | None) -> None:
        if task is not None and task not in self.tasks:
            raise MergeBenchError(f"task {task!r} is not in this result (tasks: {self.tasks})")

    def _metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "method": self.method,
            "params": self.params,
            "tasks": self.tasks,
            "version": __version__,
            "extra": self.extra,
        }


@dataclass
class SingleModelResult(MergeResult):
    """One merged model shared by all tasks (task heads, if any, stay per task)."""

    method: str
    params: dict[str, Any]
    tasks: list[str]
    shared: Mapping[str, torch.Tensor]  # a dict, or `LazyTensors` read from the files
    task_specific: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "single"

    def state_dict(self, task: str | None = None) -> dict[str, torch.Tensor]:
        self._check_task(task)
        state = dict(self.shared)
        if task is not None:
            state.update(self.task_specific.get(task, {}))
        return add_tied_keys(state, self.extra)

    def write_tensors(
        self, folder: Path, shard_bytes: int, done: frozenset[str] | set[str] = frozenset()
    ) -> None:
        if "model" not in done:
            write_tensors(folder, "model", entries_of(self.shared), self.shared.__getitem__,
                          shard_bytes)  # fmt: skip
        save_task_specific(self.task_specific, self.tasks, folder, shard_bytes)


@dataclass
class TaskConditionedResult(MergeResult):
    """EMR-style result: `W_t = W_pre + lam_t * M_t * tau_uni` on merged keys."""

    method: str
    params: dict[str, Any]
    tasks: list[str]
    pretrained: TensorReader
    unified: Mapping[str, torch.Tensor]  # float32 tau_uni per merged key (dict or lazy)
    masks: Mapping[str, torch.Tensor] | None  # packed uint8 [N, nbytes] per key; None = all ones
    rescalers: dict[str, float]
    copied: dict[str, torch.Tensor]
    task_specific: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    pretrained_excluded: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "task_conditioned"
    # The pretrained digest computed meanwhile (`artifact.background_digest`), if any.
    digest: Callable[[], str] | None = field(default=None, repr=False, compare=False)

    def mask(self, task: str, key: str) -> torch.Tensor | None:
        """The bool mask of `task` on `key`, or None when masks are off (all ones)."""
        if self.masks is None:
            return None
        row = self.masks[key][self.tasks.index(task)]
        return unpack_bits(row, shape_of(self.unified, key))

    def task_delta(self, task: str, key: str) -> torch.Tensor:
        """`lam_t * M_t * tau_uni` in float32."""
        delta = self.unified[key] * self.rescalers[task]
        mask = self.mask(task, key)
        if mask is None:
            return delta
        # x * 1 and x * 0 are exact either way; a uint8 view takes torch's fast multiply.
        return delta.mul_(mask.view(torch.uint8) if mask.device.type == "cpu" else mask)

    def state_dict(self, task: str | None = None) -> dict[str, torch.Tensor]:
        if task is None:
            raise MergeBenchError(
                f"{self.method} gives one model per task: call state_dict(task=...) "
                f"with one of {self.tasks}"
            )
        self._check_task(task)
        state: dict[str, torch.Tensor] = dict(self.pretrained_excluded)
        for key in self.unified:
            pre = self.pretrained.get(key)
            # delta + pre == pre + delta exactly; adding in place saves a model-sized copy.
            state[key] = self.task_delta(task, key).add_(pre).to(pre.dtype)
        state.update(self.copied)
        state.update(self.task_specific.get(task, {}))
        return add_tied_keys(state, self.extra)

    def describe(self) -> dict[str, Any]:
        meta = self._metadata()
        meta["rescalers"] = check_rescalers(self.rescalers, self.tasks, "result")
        meta["masked"] = self.masks is not None
        meta["shapes"] = {k: list(shape_of(self.unified, k)) for k in self.unified}
        # One pass over the pretrained weights: the digest of the tensors the deltas apply
        # to checks the recorded files on load too (results before 2026-11-26 also
        # recorded each file's sha256, a second pass, which is still checked when present).
        keys = list(self.unified)
        meta["pretrained_digest"] = (
            self.digest() if self.digest else pretrained_digest(self.pretrained, keys)
        )
        files = self.pretrained.files()
        if files:
            meta["pretrained"] = {"files": [str(f.resolve()) for f in files]}
        else:
            meta["pretrained"] = {"embedded": "pretrained"}
        return meta

    def write_tensors(
        self, folder: Path, shard_bytes: int, done: frozenset[str] | set[str] = frozenset()
    ) -> None:
        check_rescalers(self.rescalers, self.tasks, "result")
        if "unified" not in done:
            write_tensors(folder, "unified", entries_of(self.unified), self.unified.__getitem__,
                          shard_bytes)  # fmt: skip
        if self.masks is not None and "masks" not in done:
            write_tensors(folder, "masks", entries_of(self.masks), self.masks.__getitem__,
                          shard_bytes, metadata={"tasks": json.dumps(self.tasks)})  # fmt: skip
        copied = {**self.copied, **self.pretrained_excluded}
        write_tensors(folder, "copied", entries_of(copied), copied.__getitem__, shard_bytes,
                      metadata={"pretrained_excluded": json.dumps(list(self.pretrained_excluded))})  # fmt: skip
        save_task_specific(self.task_specific, self.tasks, folder, shard_bytes)
        if not self.pretrained.files():  # an in-memory pretrained model travels with the result
            keys = list(self.unified)
            entries = [
                Entry(k, tuple(self.pretrained.shape(k)), self.pretrained.dtype(k)) for k in keys
            ]
            write_tensors(folder, "pretrained", entries, self.pretrained.get, shard_bytes)


def save_task_specific(
    task_specific: Mapping[str, Mapping[str, torch.Tensor]],
    tasks: list[str],
    folder: Path,
    shard_bytes: int,
) -> None:
    """Keys `"<task index>::<key>"`: task names may hold anything, `::` included."""
    flat: dict[str, torch.Tensor] = {}
    for task, tensors in task_specific.items():
        if task not in tasks:
            raise MergeBenchError(f"result: task-specific tensors of unknown task {task!r}")
        for key, value in tensors.items():
            flat[f"{tasks.index(task)}{SEP}{key}"] = value
    if flat:
        write_tensors(folder, "task_specific", entries_of(flat), flat.__getitem__, shard_bytes,
                      metadata={"tasks": json.dumps(tasks)})  # fmt: skip
