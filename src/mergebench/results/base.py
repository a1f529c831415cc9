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
  content; `load_result` refuses a folder whose files or `result.json` changed since.

Tensors are written one at a time (`shards.ShardedWriter`) and loaded lazily
(`shards.LazyTensors`): saving or loading a result holds a few tensors, not a model. A
streamed merge (`stream_result`) writes its outputs straight into the artifact as keys
finish.

Saving never deletes what this library did not write: a result goes into a missing folder,
an empty one, or one holding an earlier result (recognised by its `result.json`); files of
the earlier result are replaced, anything else in the folder is left alone. Loading never
runs code (safetensors and JSON only).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.bits import unpack_bits
from mergebench.engine.checkpoints import (
    CheckpointSource,
    SafetensorsSource,
    TorchFileSource,
    open_checkpoint,
)
from mergebench.results.shards import (
    DEFAULT_SHARD_BYTES,
    Entry,
    LazyTensors,
    ShardedWriter,
    entries_of,
    open_stem,
    parse_size,
    shape_of,
    write_tensors,
)
from mergebench.results.tied import add_tied_keys
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import (
    TEMP_MARKER,
    make_marked_temp_dir,
    publish_tree,
    remove_stale_temp_dirs,
)
from mergebench.util.version import __version__

FORMAT = "mergebench-result"
# 2: manifest + checksum, task-specific keys "<task index>::<key>"; 3: sharded parts + index
FORMAT_VERSION = 3
_SEP = "::"
_META = "result.json"
# Files a version-1 result (no manifest) may hold: the only ones a save may replace there.
_V1_FILES = (
    "model.safetensors",
    "task_specific.safetensors",
    "unified.safetensors",
    "masks.safetensors",
    "copied.safetensors",
    "pretrained.safetensors",
    _META,
)


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

        return _atomic_write(_output_dir(directory), write)

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
        _save_task_specific(self.task_specific, self.tasks, folder, shard_bytes)


@dataclass
class TaskConditionedResult(MergeResult):
    """EMR-style result: `W_t = W_pre + lam_t * M_t * tau_uni` on merged keys."""

    method: str
    params: dict[str, Any]
    tasks: list[str]
    pretrained: CheckpointSource
    unified: Mapping[str, torch.Tensor]  # float32 tau_uni per merged key (dict or lazy)
    masks: Mapping[str, torch.Tensor] | None  # packed uint8 [N, nbytes] per key; None = all ones
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
        meta["rescalers"] = _check_rescalers(self.rescalers, self.tasks, "result")
        meta["masked"] = self.masks is not None
        meta["shapes"] = {k: list(shape_of(self.unified, k)) for k in self.unified}
        # One pass over the pretrained weights: the digest of the tensors the deltas apply
        # to checks the recorded files on load too (results before 2026-11-26 also
        # recorded each file's sha256, a second pass, which is still checked when present).
        meta["pretrained_digest"] = pretrained_digest(self.pretrained, list(self.unified))
        files = self.pretrained.files()
        if files:
            meta["pretrained"] = {"files": [str(f.resolve()) for f in files]}
        else:
            meta["pretrained"] = {"embedded": "pretrained"}
        return meta

    def write_tensors(
        self, folder: Path, shard_bytes: int, done: frozenset[str] | set[str] = frozenset()
    ) -> None:
        _check_rescalers(self.rescalers, self.tasks, "result")
        if "unified" not in done:
            write_tensors(folder, "unified", entries_of(self.unified), self.unified.__getitem__,
                          shard_bytes)  # fmt: skip
        if self.masks is not None and "masks" not in done:
            write_tensors(folder, "masks", entries_of(self.masks), self.masks.__getitem__,
                          shard_bytes, metadata={"tasks": json.dumps(self.tasks)})  # fmt: skip
        copied = {**self.copied, **self.pretrained_excluded}
        write_tensors(folder, "copied", entries_of(copied), copied.__getitem__, shard_bytes,
                      metadata={"pretrained_excluded": json.dumps(list(self.pretrained_excluded))})  # fmt: skip
        _save_task_specific(self.task_specific, self.tasks, folder, shard_bytes)
        if not self.pretrained.files():  # an in-memory pretrained model travels with the result
            keys = list(self.unified)
            entries = [
                Entry(k, tuple(self.pretrained.shape(k)), self.pretrained.dtype(k)) for k in keys
            ]
            write_tensors(folder, "pretrained", entries, self.pretrained.get, shard_bytes)


class ArtifactTarget:
    """Where a streamed merge writes its parts: the result's temp folder, being built."""

    def __init__(self, folder: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.done: set[str] = set()

    def writer(
        self, stem: str, entries: list[Entry], metadata: Mapping[str, str] | None = None
    ) -> ShardedWriter:
        if stem in self.done:
            raise MergeBenchError(f"result part {stem!r} written twice")
        self.done.add(stem)
        return ShardedWriter(self.folder, stem, entries, self.shard_bytes, metadata)

    def tensors(self, stem: str) -> LazyTensors:
        """A finished part, read back lazily."""
        return LazyTensors(open_stem(self.folder, stem))

    @contextmanager
    def scratch(self) -> Iterator[ArtifactTarget]:
        """A temporary target beside this one for an intermediate model (M&R's base merge),
        removed afterwards; a killed process leaves a marked folder the next save removes."""
        folder = make_marked_temp_dir(self.folder.parent, f"{self.folder.name}.scratch-")
        try:
            yield ArtifactTarget(folder, self.shard_bytes)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def stream_result(
    directory: str | Path,
    merge: Callable[[ArtifactTarget], MergeResult],
    shard_size: int | str = DEFAULT_SHARD_BYTES,
) -> MergeResult:
    """Run `merge(target)` writing into a temp folder beside `directory`, complete the parts
    it did not stream, publish the folder atomically, and load it back lazily."""
    shard_bytes = parse_size(shard_size)

    def write(tmp: Path) -> Callable[[], dict[str, Any]]:
        target = ArtifactTarget(tmp, shard_bytes)
        result = merge(target)
        result.write_tensors(tmp, shard_bytes, done=target.done)
        return result.describe

    out = _atomic_write(_output_dir(directory), write)
    return load_result(out, verify=False)


def load_result(
    directory: str | Path,
    pretrained: str | Path | Mapping[str, torch.Tensor] | None = None,
    verify: bool = True,
) -> MergeResult:
    """Load a saved result. A task-conditioned result finds its pretrained weights by the
    recorded path unless `pretrained` is given; either is checked against the recorded
    digest of the pretrained tensors unless `verify=False` (results saved before 2026-11-26
    check the recorded file's sha256 instead).

    Every file is checked against the manifest (size always, sha256 unless `verify=False`);
    any mismatch, and any inconsistency between the files, is a `MergeBenchError` naming the
    file."""
    directory = Path(directory).expanduser()
    meta_path = directory / _META
    if directory.exists() and not directory.is_dir():
        raise MergeBenchError(f"{directory}: is a file, not a mergebench result folder")
    meta = _read_meta(meta_path)
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MergeBenchError(f"{meta_path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise MergeBenchError(
            f"{meta_path}: format version {version} is newer than this mergebench reads "
            f"({FORMAT_VERSION}); upgrade mergebench"
        )
    if version >= 2:
        _check_manifest(directory, meta, verify)
    tasks = _tasks(meta, meta_path)
    for key, kind in (("params", dict), ("extra", dict), ("method", str)):
        value = meta.get(key, {} if kind is dict else None)
        if not isinstance(value, kind):
            raise MergeBenchError(
                f"{meta_path}: {key!r} is {type(value).__name__}, expected {kind.__name__}"
            )
    common = dict(method=meta["method"], params=meta.get("params", {}), tasks=tasks,
                  extra=meta.get("extra", {}))  # fmt: skip
    task_specific = _load_task_specific(directory, tasks, version)
    kind = meta.get("kind")
    if kind == "single":
        shared = LazyTensors(_open_part(directory, "model", version))
        return SingleModelResult(shared=shared, task_specific=task_specific, **common)
    if kind != "task_conditioned":
        raise MergeBenchError(f"{meta_path}: unknown result kind {kind!r}")
    copied_src = _open_part(directory, "copied", version)
    excluded_keys = set(_metadata_list(copied_src))
    copied_all = copied_src.state_dict()  # non-float keys and excluded ones: small
    unified = LazyTensors(_open_part(directory, "unified", version))
    _check_shapes(meta, unified, meta_path)
    masked = meta.get("masked", True)
    masks = None
    if masked:
        masks_src = _open_part(directory, "masks", version)
        masks = LazyTensors(masks_src)
        _check_masks(masks_src, masks, unified, tasks, version)
    rescalers = _check_rescalers(meta.get("rescalers"), tasks, str(meta_path))
    pre = _resolve_pretrained(directory, meta, pretrained, verify)
    if pretrained is not None:
        mismatch = "not the pretrained model this result was merged from (its weights differ); pass the original, or verify=False"
    else:
        mismatch = f"pretrained checkpoint changed since {directory} was saved (its tensors differ from the recorded digest)"
    recorded = meta.get("pretrained", {})
    by_digest = pretrained is not None or "sha256" not in recorded and "files" in recorded
    _check_pretrained(pre, unified, meta, verify and by_digest, mismatch)
    return TaskConditionedResult(
        pretrained=pre,
        unified=unified,
        masks=masks,
        rescalers=rescalers,
        copied={k: v for k, v in copied_all.items() if k not in excluded_keys},
        pretrained_excluded={k: v for k, v in copied_all.items() if k in excluded_keys},
        task_specific=task_specific,
        **common,
    )


def artifact_bytes(directory: str | Path) -> int:
    """Bytes of a saved result: the files its manifest lists (other files beside it, e.g.
    the user's notes, do not count), or every file of a folder without a manifest."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / _META).read_text())
        files = meta["manifest"]["files"]
        return (directory / _META).stat().st_size + sum(int(f["size"]) for f in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def pretrained_digest(source: CheckpointSource, keys: list[str]) -> str:
    """sha256 of the pretrained tensors a task-conditioned result adds its deltas to (key,
    dtype, shape and bytes, in key order): whatever file format they come in."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = source.get(key).detach().to("cpu").contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


# --- helpers --------------------------------------------------------------------------------
def _meta_checksum(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_text(meta: Mapping[str, Any]) -> str:
    try:
        return json.dumps(meta, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    except ValueError:
        raise MergeBenchError(
            "result: a parameter or rescaler is nan or inf; refusing to save it"
        ) from None


def _check_rescalers(rescalers: Any, tasks: list[str], where: str) -> dict[str, float]:
    if not isinstance(rescalers, Mapping):
        raise MergeBenchError(f"{where}: rescalers missing or not a mapping {{task: number}}")
    if set(rescalers) != set(tasks):
        extra = sorted(set(rescalers) - set(tasks))
        missing = sorted(set(tasks) - set(rescalers))
        raise MergeBenchError(
            f"{where}: rescalers do not match the tasks (unknown: {extra}, missing: {missing})"
        )
    out: dict[str, float] = {}
    for task in tasks:
        value = rescalers[task]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeBenchError(f"{where}: rescaler of task {task!r} is {value!r}, not a number")
        if not math.isfinite(value):
            raise MergeBenchError(f"{where}: rescaler of task {task!r} is {value}, not finite")
        out[task] = float(value)
    return out


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise MergeBenchError(f"{meta_path}: not found (not a mergebench result folder)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise MergeBenchError(f"{meta_path}: invalid JSON ({err})") from None
    except OSError as err:
        raise MergeBenchError(f"{meta_path}: cannot read ({err.strerror or err})") from None
    if not isinstance(meta, dict):
        raise MergeBenchError(
            f"{meta_path}: not a mergebench result (a JSON {type(meta).__name__}, not an object)"
        )
    if meta.get("format") != FORMAT:
        raise MergeBenchError(
            f"{meta_path}: not a mergebench result (format={meta.get('format')!r})"
        )
    return meta


def _tasks(meta: Mapping[str, Any], meta_path: Path) -> list[str]:
    tasks = meta.get("tasks")
    if (
        not isinstance(tasks, list)
        or not tasks
        or not all(isinstance(t, str) and t for t in tasks)
        or len(set(tasks)) != len(tasks)
    ):
        raise MergeBenchError(f"{meta_path}: 'tasks' must be a non-empty list of distinct names")
    if not isinstance(meta.get("method"), str):
        raise MergeBenchError(f"{meta_path}: 'method' missing")
    return list(tasks)


def _check_manifest(directory: Path, meta: Mapping[str, Any], verify: bool) -> None:
    meta_path = directory / _META
    try:
        expected = meta["checksum"]
        recorded = _meta_checksum(meta)
    except KeyError:
        raise MergeBenchError(f"{meta_path}: checksum missing (edited by hand?)") from None
    except ValueError:
        raise MergeBenchError(f"{meta_path}: holds nan or inf (edited by hand?)") from None
    if expected != recorded:
        raise MergeBenchError(
            f"{meta_path}: content changed since the result was saved (checksum mismatch)"
        )
    files = (
        meta.get("manifest", {}).get("files") if isinstance(meta.get("manifest"), dict) else None
    )
    if not isinstance(files, dict):
        raise MergeBenchError(f"{meta_path}: manifest missing")
    for name, info in files.items():
        path = directory / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise MergeBenchError(f"{meta_path}: manifest names {name!r}, not a file name")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise MergeBenchError(f"{path}: missing from the result folder") from None
        if not path.is_file() or size != info.get("size"):
            raise MergeBenchError(
                f"{path}: changed since the result was saved ({size} bytes, "
                f"manifest says {info.get('size')})"
            )
        if verify and sha256_file(path) != info.get("sha256"):
            raise MergeBenchError(f"{path}: changed since the result was saved (sha256 mismatch)")


def _open_part(directory: Path, stem: str, version: int = FORMAT_VERSION) -> SafetensorsSource:
    """A part of a result: its shards through the index, or (before format version 3,
    which introduced shards) its one file."""
    if version < 3:
        path = directory / f"{stem}.safetensors"
        if not path.is_file():
            raise MergeBenchError(f"{path}: missing from the result folder")
        return SafetensorsSource([path], f"result ({path})")
    return open_stem(directory, stem)


def _check_shapes(meta: Mapping[str, Any], unified: Mapping[str, torch.Tensor], meta_path: Path):
    shapes = meta.get("shapes")
    if shapes is None:
        return
    if not isinstance(shapes, dict) or set(shapes) != set(unified):
        raise MergeBenchError(f"{meta_path}: 'shapes' do not match the unified tensors")
    for key, shape in shapes.items():
        if list(shape_of(unified, key)) != shape:
            raise MergeBenchError(
                f"{meta_path}: {key!r} has shape {list(shape_of(unified, key))} in "
                f"the unified tensors, {shape} recorded"
            )


def _check_masks(
    source: SafetensorsSource,
    masks: LazyTensors,
    unified: Mapping[str, torch.Tensor],
    tasks: list[str],
    version: int,
) -> None:
    path = source.files()[0]
    if set(masks) != set(unified):
        missing = sorted(set(unified) - set(masks))
        raise MergeBenchError(f"{path}: masks do not match the merged keys (missing {missing[:3]})")
    for key in masks:
        want = (len(tasks), math.ceil(math.prod(shape_of(unified, key)) / 8))
        dtype, shape = masks.dtype(key), masks.shape(key)
        if dtype != torch.uint8 or tuple(shape) != want:
            raise MergeBenchError(
                f"{path}: mask of {key!r} is {dtype} {list(shape)}, "
                f"expected uint8 {list(want)} ({len(tasks)} tasks)"
            )
    if version >= 2:
        _check_recorded_tasks(source, tasks)


def _check_pretrained(
    pre: CheckpointSource,
    unified: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    digest: bool,
    mismatch: str,
) -> None:
    for key in unified:
        if key not in pre:
            raise MergeBenchError(f"{pre.name}: no tensor {key!r}, which the result merged")
        shape = shape_of(unified, key)
        if tuple(pre.shape(key)) != tuple(shape):
            raise MergeBenchError(
                f"{pre.name}: tensor {key!r} has shape {list(pre.shape(key))}, "
                f"the result needs {list(shape)}"
            )
    recorded = meta.get("pretrained_digest")
    if digest and recorded is not None and pretrained_digest(pre, list(unified)) != recorded:
        raise MergeBenchError(f"{pre.name}: {mismatch}")


def _save_task_specific(
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
            flat[f"{tasks.index(task)}{_SEP}{key}"] = value
    if flat:
        write_tensors(folder, "task_specific", entries_of(flat), flat.__getitem__, shard_bytes,
                      metadata={"tasks": json.dumps(tasks)})  # fmt: skip


def _check_recorded_tasks(source: SafetensorsSource, tasks: list[str]) -> None:
    """Every shard of a part records the tasks it was written for: they must be the
    result's (a part copied in from another result is refused)."""
    for shard in source.files():
        recorded = _safetensors_metadata_json(shard, "tasks")
        if recorded is not None and recorded != tasks:
            raise MergeBenchError(
                f"{shard}: written for tasks {recorded}, result.json says {tasks}"
            )


def _load_task_specific(
    directory: Path, tasks: list[str], version: int
) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    if (
        not (directory / "task_specific.safetensors").exists()
        and not (directory / "task_specific.safetensors.index.json").exists()
    ):
        return out
    source = _open_part(directory, "task_specific", version)
    if version >= 2:
        _check_recorded_tasks(source, tasks)
    path = source.files()[0]
    for name, tensor in source.state_dict().items():  # heads: small
        task, key = _split_task_key(name, tasks, version, path)
        out[task][key] = tensor
    return out


def _split_task_key(name: str, tasks: list[str], version: int, path: Path) -> tuple[str, str]:
    if version >= 2:
        index, sep, key = name.partition(_SEP)
        if sep and index.isdigit() and int(index) < len(tasks):
            return tasks[int(index)], key
        raise MergeBenchError(f"{path}: tensor {name!r} belongs to no task of the result")
    # Version 1 wrote "<task>::<key>": a task name holding "::" can make that ambiguous.
    owners = [t for t in tasks if name.startswith(t + _SEP)]
    if len(owners) == 1:
        return owners[0], name[len(owners[0]) + len(_SEP) :]
    if not owners:
        raise MergeBenchError(f"{path}: tensor {name!r} belongs to no task of the result")
    raise MergeBenchError(
        f"{path}: tensor {name!r} could belong to tasks {owners} (a version-1 result with "
        "'::' in task names); save it again with this version"
    )


def _safetensors_metadata_json(path: Path, field_name: str) -> Any:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(field_name)
        return None if text is None else json.loads(text)
    except Exception as err:  # safetensors raises its own error types
        raise MergeBenchError(f"{path}: unreadable metadata ({err})") from None


def _metadata_list(source: SafetensorsSource) -> list[str]:
    path = source.files()[0]
    value = _safetensors_metadata_json(path, "pretrained_excluded")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise MergeBenchError(f"{path}: malformed 'pretrained_excluded' metadata")
    return value


def _resolve_pretrained(directory: Path, meta: dict[str, Any], override, verify: bool):
    if override is not None:
        return open_checkpoint(override, role="pretrained")
    info = meta.get("pretrained", {})
    meta_path = directory / _META
    if not isinstance(info, dict):
        raise MergeBenchError(f"{meta_path}: malformed 'pretrained' entry")
    if "embedded" in info:
        if info["embedded"] not in ("pretrained", "pretrained.safetensors"):  # v3, v2
            raise MergeBenchError(f"{meta_path}: malformed 'pretrained' entry")
        return _open_part(directory, "pretrained", 2 if info["embedded"].endswith("s") else 3)
    files = info.get("files", [])
    hashes = info.get("sha256")  # absent since 2026-11-26: the tensor digest checks them
    if (
        not isinstance(files, list)
        or not (hashes is None or (isinstance(hashes, list) and len(files) == len(hashes)))
        or not all(isinstance(f, str) for f in files)
    ):
        raise MergeBenchError(f"{meta_path}: malformed 'pretrained' entry")
    paths = [Path(f) for f in files]
    if not paths:
        raise MergeBenchError(f"{meta_path}: no pretrained reference recorded")
    for path, expected in zip(paths, hashes or [None] * len(paths), strict=True):
        if not path.exists():
            raise MergeBenchError(
                f"{path}: pretrained checkpoint of {directory} not found; pass pretrained=..."
            )
        if verify and expected is not None and sha256_file(path) != expected:
            raise MergeBenchError(
                f"{path}: pretrained checkpoint changed since {directory} was saved (sha256 mismatch)"
            )
    if len(paths) == 1:
        return open_checkpoint(paths[0], role="pretrained")
    if all(f.suffix == ".safetensors" for f in paths):
        return SafetensorsSource(paths, name=f"pretrained ({paths[0].parent})")
    return TorchFileSource(paths, name=f"pretrained ({paths[0].parent})")


# --- saving ---------------------------------------------------------------------------------
def _output_dir(directory: str | Path) -> Path:
    if not str(directory).strip():
        raise MergeBenchError("output folder: empty path")
    path = Path(directory).expanduser()
    if path.name in ("", ".", ".."):  # "." has no name to make sibling temp folders from
        path = Path(os.path.abspath(path))
    if not path.name:
        raise MergeBenchError(f"{directory}: cannot save a result as the file-system root")
    return path


def _owned_files(directory: Path) -> set[str] | None:
    """Names in `directory` that an earlier save wrote (may be replaced or removed), or None
    for a missing folder. A non-empty folder without our result is an error."""
    if not directory.exists() and not directory.is_symlink():
        return None
    if not directory.is_dir():
        raise MergeBenchError(f"{directory}: exists and is not a folder; refusing to overwrite it")
    entries = {p.name for p in directory.iterdir()}
    if not entries:
        return set()
    refuse = MergeBenchError(
        f"{directory}: not empty and not a mergebench result; refusing to write into it "
        "(choose a new or empty folder)"
    )
    try:
        meta = json.loads((directory / _META).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise refuse from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise refuse
    manifest = meta.get("manifest")
    if meta.get("format_version", 1) == 1 and manifest is None:
        return {name for name in _V1_FILES if (directory / name).is_file()}
    try:
        listed = {str(name) for name in manifest["files"]}
        if meta.get("checksum") != _meta_checksum(meta):
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise MergeBenchError(
            f"{directory / _META}: edited since it was saved; refusing to replace the folder's "
            "files (remove them yourself, or choose another folder)"
        ) from None
    return {name for name in listed | {_META} if Path(name).name == name and name in entries}


def _manifest(folder: Path, pool: ThreadPoolExecutor | None = None) -> dict[str, Any]:
    """sha256 and size of every file in `folder` but `result.json` (on `pool`'s threads)."""
    files = sorted(p.name for p in folder.iterdir() if p.name not in (_META, TEMP_MARKER))
    hashes = (pool.map if pool else map)(lambda name: sha256_file(folder / name), files)
    return {
        "files": {
            name: {"sha256": digest, "size": (folder / name).stat().st_size}
            for name, digest in zip(files, hashes, strict=True)
        }
    }


def _describe_with_manifest(tmp: Path, describe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`describe()` (which may hash the pretrained weights) and the manifest's hashes, on a
    few threads at once: hashlib and file reads release the GIL, so the passes share the
    cores instead of queueing (they were 40% of a streamed ViT-B/32 EMR merge's wall time)."""
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
        described = pool.submit(describe)
        manifest = _manifest(tmp, pool)
        meta = dict(described.result())
    meta["manifest"] = manifest
    return meta


def _atomic_write(directory: Path, write: Callable[[Path], Callable[[], dict[str, Any]]]) -> Path:
    """Write the result into a marked sibling temp folder, then move it into place.

    A missing folder is renamed into place; a folder holding only an earlier result is
    swapped whole (readers never see half an artifact). An empty folder, or one that also
    holds other files (the user's notes), keeps them: the new files are moved in,
    `result.json` last, and then the files only the old manifest lists are removed. Temp
    folders of a killed earlier save are removed first. `write(tmp)` writes the tensors and
    returns how to describe them (result.json's content, without the manifest)."""
    try:
        old_files = _owned_files(directory)
        parent = directory.parent
        for ancestor in (parent, *parent.parents):
            if ancestor.exists():
                if not ancestor.is_dir():
                    raise MergeBenchError(
                        f"{directory}: cannot save the result ({ancestor} is a file, not a folder)"
                    )
                break
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(parent, directory.name)
        tmp = make_marked_temp_dir(parent, f".{directory.name}.tmp-")
    except OSError as err:
        raise _save_error(directory, err) from None
    try:
        meta = _describe_with_manifest(tmp, write(tmp))
        meta["checksum"] = _meta_checksum(json.loads(_json_text(meta)))
        (tmp / _META).write_text(_json_text(meta))
        publish_tree(tmp)  # safetensors writes 0600 files: give them the umask's permissions
        new_files = set(meta["manifest"]["files"]) | {_META}
        entries = set() if old_files is None else {p.name for p in directory.iterdir()}
        if old_files is None:
            (tmp / TEMP_MARKER).unlink()
            os.replace(tmp, directory)
        elif entries and entries <= old_files and not _holds_cwd(directory):
            old = make_marked_temp_dir(parent, f".{directory.name}.old-")
            os.replace(directory, old / "x")
            (tmp / TEMP_MARKER).unlink()
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            clash = sorted((new_files & entries) - old_files)
            if clash:
                raise MergeBenchError(
                    f"{directory / clash[0]}: not written by mergebench; refusing to overwrite it"
                )
            for name in sorted(new_files - {_META}) + [_META]:
                os.replace(tmp / name, directory / name)
            for name in sorted(old_files - new_files):
                (directory / name).unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(directory, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _holds_cwd(directory: Path) -> bool:
    """Whether the process works inside `directory` (swapping it would strand the process)."""
    try:
        cwd = Path.cwd().resolve()
        return cwd == directory.resolve() or directory.resolve() in cwd.parents
    except OSError:
        return True


def _save_error(directory: Path, err: OSError) -> MergeBenchError:
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif err.errno == errno.EROFS:
        reason = "read-only file system"
    return MergeBenchError(f"{directory}: cannot save the result ({reason})")
