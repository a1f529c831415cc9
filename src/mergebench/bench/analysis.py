"""Weight-space analysis of merge results (EMR-Merging Fig. 5) and storage accounting.

For each method and task, compare the model the method serves for that task (`W'_t`) with
the task's own fine-tuned model (`W_t`) over the merged tensors:
- sign conflicts: fraction of entries where the merged task vector `W'_t - W_pre` and the
  task vector `tau_t = W_t - W_pre` have strictly opposite signs (an entry a method leaves
  at zero is not a conflict: it is lost, not reversed);
- L2 distance `||W'_t - W_t||`;
- cosine similarity of the two task vectors (on raw weights every cosine is ~1, because the
  pretrained weights dominate, so the paper's comparison is only informative on task vectors).

Storage: bytes a method needs to serve all tasks versus N separate fine-tuned models.
Everything streams one tensor at a time and accumulates in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

import torch

from mergebench.engine.keyplan import plan_keys
from mergebench.engine.pool import ModelPool
from mergebench.results import LazyTensors, MergeResult


@dataclass(frozen=True)
class TaskWeightStats:
    method: str
    task: str
    sign_conflicts: float
    l2_distance: float
    cosine: float
    numel: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Accumulator:
    def __init__(self) -> None:
        self.conflicts = 0
        self.numel = 0
        self.sq_dist = 0.0
        self.dot = 0.0
        self.sq_merged = 0.0
        self.sq_task = 0.0

    def add(self, merged_tv: torch.Tensor, task_tv: torch.Tensor) -> None:
        m, t = merged_tv.double().flatten(), task_tv.double().flatten()
        self.conflicts += int(((m * t) < 0).sum())
        self.numel += m.numel()
        self.sq_dist += float(((m - t) ** 2).sum())
        self.dot += float((m * t).sum())
        self.sq_merged += float((m * m).sum())
        self.sq_task += float((t * t).sum())

    def cosine(self) -> float:
        denom = (self.sq_merged * self.sq_task) ** 0.5
        return self.dot / denom if denom > 0 else 0.0


def weight_stats(
    result: MergeResult,
    pool: ModelPool,
    method: str | None = None,
    keys: Iterable[str] | None = None,
) -> list[TaskWeightStats]:
    """Fig. 5 statistics of `result` for every task of `pool` (over the pool's merged keys)."""
    merged_keys = list(keys) if keys is not None else plan_keys(pool).merged
    name = method or result.method
    out = []
    for task in pool.tasks:
        served = result.state_dict(task)  # one task at a time keeps memory at one model
        acc = _Accumulator()
        for key in merged_keys:
            pre = pool.pretrained.get(key).double()
            acc.add(served[key].double() - pre, pool.finetuned[task].get(key).double() - pre)
        out.append(
            TaskWeightStats(
                method=name,
                task=task,
                sign_conflicts=acc.conflicts / acc.numel if acc.numel else 0.0,
                l2_distance=acc.sq_dist**0.5,
                cosine=acc.cosine(),
                numel=acc.numel,
            )
        )
        del served
    return out


def task_sign_conflicts(
    pool: ModelPool, keys: Iterable[str] | None = None
) -> dict[tuple[str, str], float]:
    """Between every pair of tasks: fraction of merged entries whose task vectors have
    strictly opposite signs (the interference that merging has to resolve)."""
    merged_keys = list(keys) if keys is not None else plan_keys(pool).merged
    tasks = pool.tasks
    counts = dict.fromkeys(combinations(tasks, 2), 0)
    numel = 0
    for key in merged_keys:
        pre = pool.pretrained.get(key).double()
        taus = {t: (pool.finetuned[t].get(key).double() - pre).flatten() for t in tasks}
        numel += pre.numel()
        for a, b in counts:
            counts[(a, b)] += int(((taus[a] * taus[b]) < 0).sum())
    return {pair: c / numel if numel else 0.0 for pair, c in counts.items()}


# -- storage ---------------------------------------------------------------------------------
def tensor_bytes(tensors: Mapping[str, torch.Tensor] | None) -> int:
    if not tensors:
        return 0
    if isinstance(tensors, LazyTensors):  # sizes from the file headers, nothing read
        return checkpoint_bytes(tensors.source, list(tensors))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def checkpoint_bytes(source: Any, keys: Iterable[str] | None = None) -> int:
    """Bytes of a checkpoint's tensors in their storage dtype, without loading them."""
    names = source.keys() if keys is None else keys
    return sum(source.numel(k) * source.dtype(k).itemsize for k in names)


@dataclass(frozen=True)
class StorageReport:
    method: str
    n_tasks: int
    serving_bytes: int  # everything needed to serve every task with this method
    separate_bytes: int  # N separate fine-tuned models

    @property
    def ratio(self) -> float:
        return self.serving_bytes / self.separate_bytes if self.separate_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio}


def serving_bytes(result: MergeResult, pool: ModelPool) -> int:
    """Bytes to serve all tasks: one merged model plus per-task heads, or for task-conditioned
    results the pretrained weights of merged keys, the unified vector, bit-packed masks,
    rescalers, copied tensors and heads."""
    heads = sum(tensor_bytes(t) for t in getattr(result, "task_specific", {}).values())
    if result.kind == "single":
        return tensor_bytes(result.shared) + heads  # type: ignore[attr-defined]
    unified = result.unified  # type: ignore[attr-defined]
    return (
        checkpoint_bytes(pool.pretrained, unified.keys())
        + tensor_bytes(unified)
        + tensor_bytes(getattr(result, "masks", None))
        + tensor_bytes(getattr(result, "copied", None))
        + tensor_bytes(getattr(result, "pretrained_excluded", None))
        + 4 * len(getattr(result, "rescalers", {}))
        + heads
    )


def storage_report(
    result: MergeResult, pool: ModelPool, method: str | None = None
) -> StorageReport:
    return StorageReport(
        method=method or result.method,
        n_tasks=len(pool.tasks),
        serving_bytes=serving_bytes(result, pool),
        separate_bytes=sum(checkpoint_bytes(ft) for ft in pool.finetuned.values()),
    )
