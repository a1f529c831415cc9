"""A saved merge read back for scoring (`mergebench-eval`): a mergebench result folder (any
method, single-model or task-conditioned), or another tool's output in the family's format
(a `save_pretrained` folder, mergekit / FusionBench, or one safetensors state dict file).

A single model, saved by mergebench or not, is read under the family's key names (the key
alignment of `engine.align`, as for a fine-tuned checkpoint) and gets each task's head from
that task's fine-tune, as the benchmark's own single-model merges do. A task-conditioned
result keeps its per-task weights. Anything that does not fit the family is refused naming
one key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.align import align_checkpoints
from mergebench.engine.checkpoints import TensorReader, open_checkpoint
from mergebench.engine.keymatch import compile_patterns, is_excluded
from mergebench.engine.keyplan import plan_keys
from mergebench.engine.pool import ModelPool
from mergebench.methods.base import task_specific_tensors
from mergebench.methods.registry import method_base_label, method_names, variant_label
from mergebench.results import MergeResult, SingleModelResult, TaskConditionedResult, load_result
from mergebench.results.artifact import META, pretrained_digest, read_meta
from mergebench.results.shards import LazyTensors, shape_of
from mergebench.util.errors import MergeBenchError
from mergebench.util.hashing import sha256_file

EXTERNAL = "external"  # the method of a row scored from another tool's output


@dataclass(frozen=True)
class SavedMerge:
    """A saved merge ready for the evaluator, with what names and identifies its row."""

    result: MergeResult
    method: str  # the registry name, or `external`
    label: str
    identity: dict[str, Any]  # part of the run's config: what was scored
    base_label: str | None = None


def check_saved(path: str | Path, name: str | None = None) -> None:
    """Refuse what is not a saved model before the family's checkpoints and data are opened
    (a zoo may need training first)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MergeBenchError(f"{path}: not found (expected a result folder or a model folder)")
    if not (path / META).is_file():
        open_checkpoint(path, role="saved model")  # headers only
    elif name is not None:
        raise MergeBenchError(
            f"name: {path} is a mergebench result, named by its method and options "
            "(name= is for another tool's output; label= sets the row's name)"
        )


def open_saved(path: str | Path, pool: ModelPool, name: str | None = None) -> SavedMerge:
    """`path` as a merge of `pool`'s family and tasks; `name` names another tool's output
    (default: its folder or file name) and is refused for a mergebench result."""
    path = Path(path).expanduser()
    check_saved(path, name)
    if (path / META).is_file():
        return _mergebench_result(path, pool)
    return _external(path, pool, name or path.name)


def _mergebench_result(path: Path, pool: ModelPool) -> SavedMerge:
    result = load_result(path)
    meta = read_meta(path / META)
    digest = str(meta.get("checksum") or sha256_file(path / META))
    identity = {"kind": result.kind, "method": result.method, "params": result.params,
                "digest": digest}  # fmt: skip
    known = result.method in method_names()
    label = variant_label(result.method, result.params) if known else result.method
    base_label = method_base_label(result.method, result.params) if known else None
    if isinstance(result, TaskConditionedResult):
        missing = [t for t in pool.tasks if t not in result.tasks]
        if missing:
            raise MergeBenchError(
                f"{path}: a task-conditioned result without task {missing[0]!r} of the task "
                f"set (it has {', '.join(result.tasks)}); merge it with every task"
            )
        for key in result.unified:
            if key not in pool.pretrained:
                raise MergeBenchError(
                    f"{path}: tensor {key!r} is not in the family's model (a task-conditioned "
                    "result is read under its own key names: merge it from a pretrained "
                    f"checkpoint named as the family's, e.g. {pool.pretrained.keys()[0]!r})"
                )
            _check_shape(path, key, shape_of(result.unified, key), pool.pretrained)
        return SavedMerge(result, result.method, label, identity, base_label)
    if not isinstance(result, SingleModelResult) or not isinstance(result.shared, LazyTensors):
        raise MergeBenchError(f"{path}: a {result.kind} result cannot be scored here")
    scored = _with_family_heads(result.shared.source, pool, path, result.method, result.params)
    return SavedMerge(scored, result.method, label, identity, base_label)


def _external(path: Path, pool: ModelPool, name: str) -> SavedMerge:
    reader = open_checkpoint(path, role="saved model")
    # The tensors, not their files: the same weights sharded otherwise are the same row
    # (sha256, as the rows already stored were keyed before results moved to BLAKE3).
    digest = pretrained_digest(reader, list(reader.keys()), "sha256")
    result = _with_family_heads(reader, pool, path, EXTERNAL, {"name": name})
    identity = {"kind": EXTERNAL, "name": name, "digest": digest}
    return SavedMerge(result, EXTERNAL, f"{EXTERNAL} ({name})", identity)


def _with_family_heads(
    reader: TensorReader, pool: ModelPool, path: Path, method: str, params: dict[str, Any]
) -> SingleModelResult:
    """The saved model under the family's key names, each task with its fine-tune's head."""
    _, aligned, alignment = align_checkpoints(pool.pretrained, {"saved": reader}, pool.exclude)
    saved = aligned["saved"]
    plan = plan_keys(pool)
    patterns = compile_patterns(pool.exclude)
    backbone = [k for k in pool.pretrained.keys() if not is_excluded(k, patterns)]
    for key in backbone:
        if key not in saved:
            raise MergeBenchError(
                f"{path}: no tensor {key!r}, which the family's model has "
                f"(shape {list(pool.pretrained.shape(key))}); not a model of this family"
            )
        _check_shape(path, key, saved.shape(key), pool.pretrained)
    return SingleModelResult(
        method=method,
        params=params,
        tasks=pool.tasks,
        shared=_Backbone(saved, backbone, pool.pretrained, plan.pretrained_excluded),
        task_specific=task_specific_tensors(pool, plan),
        extra={"key_alignment": alignment} if alignment else {},
    )


def _check_shape(path: Path, key: str, have: Any, pretrained: TensorReader) -> None:
    if tuple(have) != tuple(pretrained.shape(key)):
        raise MergeBenchError(
            f"{path}: tensor {key!r} has shape {list(have)}, the family's model "
            f"{list(pretrained.shape(key))}; not a model of this family"
        )


class _Backbone(Mapping[str, torch.Tensor]):
    """The saved model's tensors on the family's keys, read on access; keys a head pattern
    matches in the pretrained model come from it (each task's own head replaces them)."""

    def __init__(
        self, saved: TensorReader, keys: list[str], pretrained: TensorReader, excluded: list[str]
    ) -> None:
        self._from = {**{k: pretrained for k in excluded}, **{k: saved for k in keys}}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._from[key].get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._from)

    def __len__(self) -> int:
        return len(self._from)

    def files(self) -> list[Path]:
        return sorted({f for source in self._from.values() for f in source.files()})
