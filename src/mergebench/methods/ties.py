"""TIES-Merging: trim, elect sign, disjoint merge, then `W_pre + lam * tau_m` (methods.md).

Trim keeps, per task, the entries whose |value| is at least the `keep`-th largest, with
`keep = max(1, floor(k * n + 0.5))` over `n` entries: over all merged tensors of the task
together (`topk_scope=global`, exact even when streamed) or per tensor (`tensor`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergebench.methods.base import TaskVectorMethod, choice, fraction, number, sign
from mergebench.stream import TaskVectorStream
from mergebench.topk import kth_largest_abs, kth_largest_abs_in_tensor


def keep_count(k: float, n: int) -> int:
    return max(1, math.floor(k * n + 0.5))


def trim(task_vectors: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry whose |value| is below its task's threshold (ties at it are kept)."""
    shape = (-1,) + (1,) * (task_vectors.dim() - 1)
    keep = task_vectors.abs() >= thresholds.reshape(shape).to(task_vectors.device)
    return task_vectors * keep


def elect_and_disjoint_merge(trimmed: torch.Tensor, aggregate: str) -> torch.Tensor:
    """`gamma = sgn(sum_t trimmed_t)`; combine the non-zero entries that agree with gamma."""
    gamma = sign(trimmed.sum(dim=0))
    agree = trimmed * gamma > 0
    total = (trimmed * agree).sum(dim=0)
    if aggregate == "sum":
        return total
    count = agree.sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


class Ties(TaskVectorMethod):
    name = "ties"

    def __init__(self, k: Any, scaling: Any, aggregate: str, topk_scope: str) -> None:
        super().__init__(k=k, scaling=scaling, aggregate=aggregate, topk_scope=topk_scope)
        self.k = fraction(self.name, "k", k)
        self.scaling = number(self.name, "scaling", scaling)
        self.aggregate = choice(self.name, "aggregate", aggregate, ("sum", "mean"))
        self.topk_scope = choice(self.name, "topk_scope", topk_scope, ("global", "tensor"))
        self._thresholds: torch.Tensor | None = None

    def prepare(self, stream: TaskVectorStream) -> None:
        if self.topk_scope != "global":
            return
        n = sum(stream.numel(key) for key in stream.plan.merged)
        keep = [keep_count(self.k, n)] * len(stream.tasks)
        self._thresholds = kth_largest_abs(
            lambda: (item.task_vectors for item in stream.passes("ties: top-k")),
            len(stream.tasks),
            keep,
        )

    def thresholds_for(self, task_vectors: torch.Tensor) -> torch.Tensor:
        if self.topk_scope == "global":
            assert self._thresholds is not None, "prepare() computes the global thresholds"
            return self._thresholds
        keep = keep_count(self.k, task_vectors[0].numel())
        return torch.stack([kth_largest_abs_in_tensor(tau, keep) for tau in task_vectors])

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        trimmed = trim(task_vectors, self.thresholds_for(task_vectors))
        return self.scaling * elect_and_disjoint_merge(trimmed, self.aggregate)
