"""Merge results: one merged model, or task-conditioned (a unified vector plus per-task modulators).

Both answer `state_dict(task)`, so the evaluator never needs to know which kind it holds.

On disk (a folder, written atomically):
- single model: `model.safetensors` (the full shared state dict) and, when tasks have their
  own heads, `task_specific.safetensors` (keys `"<task>::<key>"`);
- task-conditioned: `unified.safetensors` (float32 `tau_uni` per merged key),
  `masks.safetensors` (uint8 `[N, ceil(numel/8)]` per key, 8 entries per byte; absent when
  masks are off), `copied.safetensors` (non-float keys), `task_specific.safetensors`, and the
  pretrained weights by reference (path + sha256 checked on load) or, for an in-memory
  pretrained model, `pretrained.safetensors`;
- both: `result.json` (method, parameters, tasks, rescalers, version).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mergebench.engine.bits import unpack_bits
from mergebench.engine.checkpoints import (
    CheckpointSource,
    SafetensorsSource,
    TorchFileSource,
    open_checkpoint,
)
from mergebench.util.errors import MergeBenchError
from mergebench.util.version import __version__

FORMAT = "mergebench-result"
FORMAT_VERSION = 1
_SEP = "::"


class MergeResult:
    """Common interface of merge results."""

    kind: str
    method: str
    params: dict[str, Any]
    tasks: list[str]
    extra: dict[str, Any]

    def state_dict(self, task: str | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        raise NotImplementedError

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
    shared: dict[str, torch.Tensor]
    task_specific: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "single"

    def state_dict(self, task: str | None = None) -> dict[str, torch.Tensor]:
        self._check_task(task)
        state = dict(self.shared)
        if task is not None:
            state.update(self.task_specific.get(task, {}))
        return state

    def save(self, directory: str | Path) -> Path:
        def write(tmp: Path) -> None:
            save_file(_contiguous(self.shared), tmp / "model.safetensors")
            _save_task_specific(self.task_specific, tmp)
            _write_json(tmp / "result.json", self._metadata())

        return _atomic_write(Path(directory), write)


@dataclass
class TaskConditionedResult(MergeResult):
    """EMR-style result: `W_t = W_pre + lam_t * M_t * tau_uni` on merged keys."""

    method: str
    params: dict[str, Any]
    tasks: list[str]
    pretrained: CheckpointSource
    unified: dict[str, torch.Tensor]  # float32 tau_uni per merged key
    masks: dict[str, torch.Tensor] | None  # packed uint8 [N, nbytes] per key; None = all ones
    rescalers: dict[str, float]
    copied: dict[str, torch.Tensor]
    task_specific: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    pretrained_excluded: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "task_conditioned"

    def mask(self, task: str, key: str) -> torch.Tensor | None:
        """The bool mask of `task` on `key`, or None when masks are off (all ones)."""
        if self.masks is None:
            return None
        row = self.masks[key][self.tasks.index(task)]
        return unpack_bits(row, tuple(self.unified[key].shape))

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
        return state

    def save(self, directory: str | Path) -> Path:
        meta = self._metadata()
        meta["rescalers"] = self.rescalers
        meta["masked"] = self.masks is not None
        meta["shapes"] = {k: list(v.shape) for k, v in self.unified.items()}
        files = self.pretrained.files()

        def write(tmp: Path) -> None:
            save_file(_contiguous(self.unified), tmp / "unified.safetensors")
            if self.masks is not None:
                save_file(_contiguous(self.masks), tmp / "masks.safetensors")
            save_file(
                _contiguous({**self.copied, **self.pretrained_excluded}),
                tmp / "copied.safetensors",
                metadata={"pretrained_excluded": json.dumps(list(self.pretrained_excluded))},
            )
            _save_task_specific(self.task_specific, tmp)
            if files:
                meta["pretrained"] = {
                    "files": [str(f.resolve()) for f in files],
                    "sha256": [sha256_file(f) for f in files],
                }
            else:
                keys = list(self.unified)
                save_file(
                    _contiguous(self.pretrained.state_dict(keys)), tmp / "pretrained.safetensors"
                )
                meta["pretrained"] = {"embedded": "pretrained.safetensors"}
            _write_json(tmp / "result.json", meta)

        return _atomic_write(Path(directory), write)


def load_result(
    directory: str | Path,
    pretrained: str | Path | Mapping[str, torch.Tensor] | None = None,
    verify: bool = True,
) -> MergeResult:
    """Load a saved result. A task-conditioned result finds its pretrained weights by the
    recorded path (checked by sha256 unless `verify=False`) unless `pretrained` is given."""
    directory = Path(directory)
    meta_path = directory / "result.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise MergeBenchError(f"{meta_path}: not found (not a mergebench result folder)") from None
    except ValueError as err:
        raise MergeBenchError(f"{meta_path}: invalid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise MergeBenchError(
            f"{meta_path}: not a mergebench result (format={meta.get('format')!r})"
        )
    common = dict(
        method=meta["method"],
        params=meta["params"],
        tasks=meta["tasks"],
        extra=meta.get("extra", {}),
    )
    task_specific = _load_task_specific(directory, meta["tasks"])
    if meta["kind"] == "single":
        shared = open_checkpoint(directory / "model.safetensors", role="result").state_dict()
        return SingleModelResult(shared=shared, task_specific=task_specific, **common)
    if meta["kind"] != "task_conditioned":
        raise MergeBenchError(f"{meta_path}: unknown result kind {meta['kind']!r}")
    copied_src = open_checkpoint(directory / "copied.safetensors", role="result")
    excluded_keys = set(_safetensors_metadata_list(directory / "copied.safetensors"))
    copied_all = copied_src.state_dict()
    unified = open_checkpoint(directory / "unified.safetensors", role="result").state_dict()
    masks = (
        open_checkpoint(directory / "masks.safetensors", role="result").state_dict()
        if meta.get("masked", True)
        else None
    )
    return TaskConditionedResult(
        pretrained=_resolve_pretrained(directory, meta, pretrained, verify),
        unified=unified,
        masks=masks,
        rescalers={t: float(v) for t, v in meta["rescalers"].items()},
        copied={k: v for k, v in copied_all.items() if k not in excluded_keys},
        pretrained_excluded={k: v for k, v in copied_all.items() if k in excluded_keys},
        task_specific=task_specific,
        **common,
    )


def artifact_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- helpers --------------------------------------------------------------------------------
def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _save_task_specific(task_specific: dict[str, dict[str, torch.Tensor]], tmp: Path) -> None:
    flat = {f"{t}{_SEP}{k}": v for t, tensors in task_specific.items() for k, v in tensors.items()}
    if flat:
        save_file(_contiguous(flat), tmp / "task_specific.safetensors")


def _load_task_specific(directory: Path, tasks: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    path = directory / "task_specific.safetensors"
    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    if path.exists():
        for name, tensor in open_checkpoint(path, role="result").state_dict().items():
            task, key = name.split(_SEP, 1)
            out[task][key] = tensor
    return out


def _safetensors_metadata_list(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get("pretrained_excluded", "[]"))


def _resolve_pretrained(directory: Path, meta: dict[str, Any], override, verify: bool):
    if override is not None:
        return open_checkpoint(override, role="pretrained")
    info = meta.get("pretrained", {})
    if "embedded" in info:
        return open_checkpoint(directory / info["embedded"], role="pretrained")
    files = [Path(f) for f in info.get("files", [])]
    if not files:
        raise MergeBenchError(f"{directory / 'result.json'}: no pretrained reference recorded")
    for path, expected in zip(files, info.get("sha256", []), strict=True):
        if not path.exists():
            raise MergeBenchError(
                f"{path}: pretrained checkpoint of {directory} not found; pass pretrained=..."
            )
        if verify and sha256_file(path) != expected:
            raise MergeBenchError(
                f"{path}: pretrained checkpoint changed since {directory} was saved (sha256 mismatch)"
            )
    if len(files) == 1:
        return open_checkpoint(files[0], role="pretrained")
    if all(f.suffix == ".safetensors" for f in files):
        return SafetensorsSource(files, name=f"pretrained ({files[0].parent})")
    return TorchFileSource(files, name=f"pretrained ({files[0].parent})")


def _atomic_write(directory: Path, write) -> Path:
    """Write into a sibling temp folder, then swap it in: never a half-written artifact."""
    directory = directory.expanduser()
    if directory.exists() and any(directory.iterdir()) and not (directory / "result.json").exists():
        raise MergeBenchError(
            f"{directory}: exists and is not a mergebench result; refusing to overwrite it"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / "x")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
