"""The Python entry point: `mergebench.merge("emr", pretrained=..., finetuned=..., ...)`."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.align import describe_alignment
from mergebench.engine.checkpoints import CheckpointLike, TensorReader
from mergebench.engine.keyplan import check_task_specific, plan_keys
from mergebench.engine.llm import check_vocab, dtype_name, parse_out_dtype, prepare_pool
from mergebench.engine.pool import ModelPool
from mergebench.methods.base import RunContext
from mergebench.methods.registry import build_method, method_defaults
from mergebench.results import (
    DEFAULT_SHARD_BYTES,
    ArtifactTarget,
    MergeResult,
    parse_size,
    stream_result,
)
from mergebench.util.errors import MergeBenchError


def merge(
    method: str,
    pretrained: CheckpointLike,
    finetuned: Mapping[str, CheckpointLike],
    exclude: Iterable[str] = (),
    heads_separate: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    output_dir: str | Path | None = None,
    shard_size: int | str = DEFAULT_SHARD_BYTES,
    vocab: str = "base",
    out_dtype: str | torch.dtype | None = None,
    key_map: Mapping[str, Any] | None = None,
    strip_prefix: str | Mapping[str, str] | None = None,
    task_specific: str = "exclude",
    **params: Any,
) -> MergeResult:
    """Merge `finetuned` models (task name -> path or state dict) into one result.

    `exclude` lists regexes of task-specific keys (heads): each task keeps its own.
    Fine-tuned models whose keys carry a prefix the pretrained model's lack (or the
    reverse: `bert.embeddings.*` beside `embeddings.*`) are merged under the pretrained
    model's key names; the prefix is detected, or given by `strip_prefix` (`'bert.'` for
    every fine-tuned model, or {checkpoint: prefix}, a checkpoint being a task or
    `pretrained`) or `key_map` ({from: to} rules, `from` a key prefix or a `^regex`, for
    every fine-tuned model or per checkpoint). The renaming is recorded in
    `result.extra["key_alignment"]`.
    `task_specific="auto"` keeps each task's own tensor for every key that some model
    lacks or holds in another shape (instead of an error), recorded with the reason in
    `result.extra["task_specific_keys"]`.
    `params` override the method's defaults from `conf/method/<method>.yaml`.
    With `output_dir`, the artifact is written there (atomically, in safetensors shards of
    at most `shard_size`) as the merge goes, data-free methods writing each tensor as it is
    finished, and the result returned reads from those files: memory holds a few tensors
    per task, not the merged model.

    Causal LMs (see `engine.llm`): tied embeddings are merged once; `vocab` (`base` or
    `union`) says what happens to an expert's extra vocabulary rows; `out_dtype` (`base`,
    `float32`, `bfloat16`, `float16`) is the merged weights' dtype (default: the base's).
    The checkpoints' files are recorded in `result.extra["checkpoints"]` (for export).
    """
    device = check_device(device)
    exclude = check_exclude(exclude)
    check_vocab(vocab)
    parse_out_dtype(out_dtype)
    if not isinstance(finetuned, Mapping) or not finetuned:
        raise MergeBenchError(
            f"finetuned: expected a mapping {{task: checkpoint}}, got {type(finetuned).__name__}"
        )
    for task in finetuned:
        if not isinstance(task, str) or not task.strip():
            raise MergeBenchError(f"finetuned: task names must be non-empty strings, got {task!r}")
    check_params(method, params)  # before any checkpoint is read
    if output_dir is not None:
        parse_size(shard_size)  # a bad size fails before any checkpoint is read
    check_task_specific(task_specific)
    pool = ModelPool.from_checkpoints(
        pretrained, finetuned, exclude, heads_separate, key_map=key_map,
        strip_prefix=strip_prefix, task_specific=task_specific,
    )  # fmt: skip
    record = {"checkpoints": _checkpoint_files(pool)}
    return _merge_pool(method, pool, device, progress, output_dir, shard_size, vocab, out_dtype,
                       record, params)  # fmt: skip


def merge_pool(
    method: str,
    pool: ModelPool,
    device: str | torch.device = "cpu",
    progress: bool = True,
    output_dir: str | Path | None = None,
    shard_size: int | str = DEFAULT_SHARD_BYTES,
    vocab: str = "base",
    out_dtype: str | torch.dtype | None = None,
    **params: Any,
) -> MergeResult:
    """`merge` on an opened pool (see there)."""
    record = {"checkpoints": _checkpoint_files(pool)}
    return _merge_pool(method, pool, device, progress, output_dir, shard_size, vocab, out_dtype,
                       record, params)  # fmt: skip


def _merge_pool(
    method: str,
    pool: ModelPool,
    device: str | torch.device,
    progress: bool,
    output_dir: str | Path | None,
    shard_size: int | str,
    vocab: str,
    out_dtype: str | torch.dtype | None,
    record: dict[str, Any],
    params: dict[str, Any],
) -> MergeResult:
    device = check_device(device)
    check_params(method, params)
    check_vocab(vocab)
    dtype = parse_out_dtype(out_dtype)
    instance = build_method(method, **params)
    # Files the merge reads: the output folder must not hold any (a save replaces its files).
    inputs = [path for source in (pool.pretrained, *pool.finetuned.values())
              for path in source.files()]  # fmt: skip
    alignment = pool.key_alignment  # the renaming the checkpoints are merged under
    if progress:
        for line in describe_alignment(alignment, pool.pretrained.name):
            print(f"mergebench: {line}", file=sys.stderr, flush=True)
    # A task-conditioned result keeps the base by reference: its output dtype is applied
    # where its per-task weights are written out (export), and recorded here.
    conditioned = type(instance).task_conditioned
    pool, notes = prepare_pool(pool, vocab, None if conditioned else dtype, progress)
    if conditioned and dtype is not None:
        notes["out_dtype"] = dtype_name(dtype)
    if alignment:
        notes["key_alignment"] = alignment
    if pool.task_specific == "auto":
        notes["task_specific_keys"] = plan_keys(pool).auto
    notes["method_version"] = type(instance).version
    notes.update(record)

    def noted(result: MergeResult) -> MergeResult:
        result.extra.update(notes)
        return result

    if output_dir is None:
        return noted(instance.merge(pool, RunContext(device, progress)))

    def merge_into(target: ArtifactTarget) -> MergeResult:
        return noted(instance.merge(pool, RunContext(device, progress, target)))

    return stream_result(output_dir, merge_into, shard_size, inputs)


def _checkpoint_files(pool: ModelPool) -> dict[str, Any]:
    """Where each checkpoint was read from (absolute file paths; [] for a state dict)."""

    def files(source: TensorReader) -> list[str]:
        # Through views and renamings to the files read (a renamed reader reports none, so
        # that a result never reopens them under the other names; export wants the folder).
        while not source.files():
            inner = getattr(source, "inner", None) or getattr(source, "source", None)
            if not isinstance(inner, TensorReader):
                break
            source = inner
        return [str(path.resolve()) for path in source.files()]

    return {
        "pretrained": files(pool.pretrained),
        "finetuned": {task: files(source) for task, source in pool.finetuned.items()},
    }


def check_device(device: Any) -> str | torch.device:
    """A torch device this machine has: `device=tpu` or `cuda` without a GPU fail here, in
    one line, not deep inside the first tensor operation."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MergeBenchError(
            f"device: {device!r} is not a torch device (use cpu, cuda, cuda:1, mps)"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeBenchError(f"device: {device!r} requested but no CUDA GPU is available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise MergeBenchError(
                f"device: {device!r} does not exist ({torch.cuda.device_count()} GPUs)"
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise MergeBenchError(f"device: {device!r} requested but MPS is not available")
    elif parsed.type != "cpu":
        raise MergeBenchError(f"device: {device!r} is not supported (use cpu, cuda, cuda:1, mps)")
    return device


def check_exclude(exclude: Any) -> list[str]:
    """A list of regexes: a bare string would be split into one-character patterns."""
    if isinstance(exclude, str):
        raise MergeBenchError(
            f"exclude: expected a list of regexes, got the string {exclude!r}; "
            f"write exclude=[{exclude}] on the command line, exclude=[{exclude!r}] in Python"
        )
    try:
        patterns = list(exclude)
    except TypeError:
        raise MergeBenchError(
            f"exclude: expected a list of regexes, got {type(exclude).__name__}"
        ) from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise MergeBenchError(f"exclude: {pattern!r} is not a regex string")
    return patterns


def check_params(method: str, params: Mapping[str, Any]) -> None:
    """Options that hold a mapping (`base_params`, any default that is a mapping) must be
    given a mapping: `method.base_params=k` fails here, not deep in the method."""
    defaults = method_defaults(method)
    for option, value in params.items():
        wants_mapping = option.endswith("_params") or isinstance(defaults.get(option), Mapping)
        if wants_mapping and value is not None and not isinstance(value, Mapping):
            raise MergeBenchError(
                f"{method}.{option}: expected a mapping like {{k: 0.1}}, got {value!r}"
            )
