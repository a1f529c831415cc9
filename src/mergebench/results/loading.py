"""Loading a saved result: `result.json` and the manifest checked first (`artifact.py`),
then each part opened lazily and checked against the others (shapes, masks, tasks) and, for a
task-conditioned result, against the pretrained weights its deltas apply to. Loading never
runs code (safetensors and JSON only); every inconsistency is a `MergeBenchError` naming the
file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.checkpoints import (
    SafetensorsReader,
    TensorReader,
    TorchFileReader,
    open_checkpoint,
)
from mergebench.results.artifact import (
    FORMAT_VERSION,
    META,
    SEP,
    check_manifest,
    check_recorded_tasks,
    check_rescalers,
    excluded_keys_of,
    open_part,
    pretrained_digest,
    read_meta,
    read_tasks,
)
from mergebench.results.kinds import MergeResult, SingleModelResult, TaskConditionedResult
from mergebench.results.shards import LazyTensors, shape_of
from mergebench.util.errors import MergeBenchError
from mergebench.util.hashing import format_digest, sha256_file


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
    meta_path = directory / META
    if directory.exists() and not directory.is_dir():
        raise MergeBenchError(f"{directory}: is a file, not a mergebench result folder")
    meta = read_meta(meta_path)
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MergeBenchError(f"{meta_path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise MergeBenchError(
            f"{meta_path}: format version {version} is newer than this mergebench reads "
            f"({FORMAT_VERSION}); upgrade mergebench"
        )
    if version >= 2:
        check_manifest(directory, meta, verify)
    tasks = read_tasks(meta, meta_path)
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
        shared = LazyTensors(open_part(directory, "model", version))
        return SingleModelResult(shared=shared, task_specific=task_specific, **common)
    if kind != "task_conditioned":
        raise MergeBenchError(f"{meta_path}: unknown result kind {kind!r}")
    copied_src = open_part(directory, "copied", version)
    excluded_keys = set(excluded_keys_of(copied_src))
    copied_all = copied_src.state_dict()  # non-float keys and excluded ones: small
    unified = LazyTensors(open_part(directory, "unified", version))
    _check_shapes(meta, unified, meta_path)
    masked = meta.get("masked", True)
    masks = None
    if masked:
        masks_src = open_part(directory, "masks", version)
        masks = LazyTensors(masks_src)
        _check_masks(masks_src, masks, unified, tasks, version)
    rescalers = check_rescalers(meta.get("rescalers"), tasks, str(meta_path))
    pre = _resolve_pretrained(directory, meta, pretrained, verify)
    if pretrained is not None:
        mismatch = "not the pretrained model this result was merged from (its weights differ); pass the original, or verify=False"
    else:
        mismatch = f"pretrained checkpoint changed since {directory} was saved (its tensors differ from the recorded digest)"
    recorded = meta.get("pretrained", {})
    by_digest = pretrained is not None or "sha256" not in recorded and "files" in recorded
    _check_pretrained(pre, unified, meta, verify and by_digest, mismatch, format_digest(version))
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
    source: SafetensorsReader,
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
        check_recorded_tasks(source, tasks)


def _check_pretrained(
    pre: TensorReader,
    unified: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    digest: bool,
    mismatch: str,
    algorithm: str,
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
    if (
        digest
        and recorded is not None
        and pretrained_digest(pre, list(unified), algorithm) != recorded
    ):
        raise MergeBenchError(f"{pre.name}: {mismatch}")


def _load_task_specific(
    directory: Path, tasks: list[str], version: int
) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    if (
        not (directory / "task_specific.safetensors").exists()
        and not (directory / "task_specific.safetensors.index.json").exists()
    ):
        return out
    source = open_part(directory, "task_specific", version)
    if version >= 2:
        check_recorded_tasks(source, tasks)
    path = source.files()[0]
    for name, tensor in source.state_dict().items():  # heads: small
        task, key = _split_task_key(name, tasks, version, path)
        out[task][key] = tensor
    return out


def _split_task_key(name: str, tasks: list[str], version: int, path: Path) -> tuple[str, str]:
    if version >= 2:
        index, sep, key = name.partition(SEP)
        if sep and index.isdigit() and int(index) < len(tasks):
            return tasks[int(index)], key
        raise MergeBenchError(f"{path}: tensor {name!r} belongs to no task of the result")
    # Version 1 wrote "<task>::<key>": a task name holding "::" can make that ambiguous.
    owners = [t for t in tasks if name.startswith(t + SEP)]
    if len(owners) == 1:
        return owners[0], name[len(owners[0]) + len(SEP) :]
    if not owners:
        raise MergeBenchError(f"{path}: tensor {name!r} belongs to no task of the result")
    raise MergeBenchError(
        f"{path}: tensor {name!r} could belong to tasks {owners} (a version-1 result with "
        "'::' in task names); save it again with this version"
    )


def _resolve_pretrained(directory: Path, meta: dict[str, Any], override, verify: bool):
    if override is not None:
        return open_checkpoint(override, role="pretrained")
    info = meta.get("pretrained", {})
    meta_path = directory / META
    if not isinstance(info, dict):
        raise MergeBenchError(f"{meta_path}: malformed 'pretrained' entry")
    if "embedded" in info:
        if info["embedded"] not in ("pretrained", "pretrained.safetensors"):  # v3, v2
            raise MergeBenchError(f"{meta_path}: malformed 'pretrained' entry")
        return open_part(directory, "pretrained", 2 if info["embedded"].endswith("s") else 3)
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
        return SafetensorsReader(paths, name=f"pretrained ({paths[0].parent})")
    return TorchFileReader(paths, name=f"pretrained ({paths[0].parent})")
