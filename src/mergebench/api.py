"""The Python entry point: `mergebench.merge("emr", pretrained=..., finetuned=..., ...)`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from mergebench.engine.checkpoints import CheckpointLike
from mergebench.engine.pool import ModelPool
from mergebench.methods.registry import build_method
from mergebench.results import MergeResult


def merge(
    method: str,
    pretrained: CheckpointLike,
    finetuned: Mapping[str, CheckpointLike],
    exclude: Iterable[str] = (),
    heads_separate: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **params: Any,
) -> MergeResult:
    """Merge `finetuned` models (task name -> path or state dict) into one result.

    `exclude` lists regexes of task-specific keys (heads): each task keeps its own.
    `params` override the method's defaults from `conf/method/<method>.yaml`.
    """
    pool = ModelPool.from_checkpoints(pretrained, finetuned, exclude, heads_separate)
    return merge_pool(method, pool, device=device, progress=progress, **params)


def merge_pool(
    method: str,
    pool: ModelPool,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **params: Any,
) -> MergeResult:
    instance = build_method(method, **params)
    instance.device, instance.progress = device, progress
    return instance.merge(pool)
