"""Mask & Rescale against a unified task vector: shared by EMR and "X w/ M&R".

- Mask: `M_t = (tau_t * tau_uni > 0)`, one bit per entry per task (stored bit-packed).
- Rescale: one scalar per task,
  `tensor_mean`: `lam_t = sum_tensors mean|tau_t| / sum_tensors mean|M_t * tau_uni|`;
  `global`:      `lam_t = sum|tau_t| / sum|M_t * tau_uni|` over all merged entries.
  Sums are accumulated in float64. Where the denominator is 0 (the task's mask keeps
  nothing), `M_t * tau_uni` is 0 everywhere, so `lam_t` cannot change the weights; we
  store 0 and say so in the result's `extra`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mergebench.methods.base import Method, task_specific_tensors
from mergebench.pool import ModelPool
from mergebench.results import TaskConditionedResult
from mergebench.selection import KeyPlan
from mergebench.tensors import pack_bits

RESCALERS = ("tensor_mean", "global")


def task_masks(task_vectors: torch.Tensor, unified: torch.Tensor) -> torch.Tensor:
    return task_vectors * unified > 0


class RescalerAccumulator:
    def __init__(self, num_tasks: int, mode: str) -> None:
        self.mode = mode
        self.numerator = torch.zeros(num_tasks, dtype=torch.float64)
        self.denominator = torch.zeros(num_tasks, dtype=torch.float64)

    def add(self, task_vectors: torch.Tensor, unified: torch.Tensor,
            masks: torch.Tensor | None) -> None:
        n = task_vectors.shape[0]
        tau_abs = task_vectors.abs().reshape(n, -1).to(torch.float64)
        uni_abs = unified.abs().reshape(1, -1).to(torch.float64)
        masked = uni_abs.expand(n, -1) if masks is None else uni_abs * masks.reshape(n, -1)
        reduce = torch.mean if self.mode == "tensor_mean" else torch.sum
        self.numerator += reduce(tau_abs, dim=1).cpu()
        self.denominator += reduce(masked, dim=1).cpu()

    def rescalers(self) -> torch.Tensor:
        safe = torch.where(self.denominator > 0, self.denominator, torch.ones_like(self.denominator))
        return torch.where(self.denominator > 0, self.numerator / safe, torch.zeros_like(safe))


@dataclass
class UnifiedItem:
    key: str
    task_vectors: torch.Tensor  # float32 [N, *shape]
    unified: torch.Tensor  # float32 [*shape]


def mask_and_rescale(
    method: Method,
    pool: ModelPool,
    plan: KeyPlan,
    items: Iterable[UnifiedItem],
    mask: bool,
    rescale: bool,
    rescaler: str,
) -> TaskConditionedResult:
    """Build the task-conditioned result from unified vectors streamed key by key."""
    tasks = pool.tasks
    accumulator = RescalerAccumulator(len(tasks), rescaler)
    unified: dict[str, torch.Tensor] = {}
    packed: dict[str, torch.Tensor] = {}
    for item in items:
        masks = task_masks(item.task_vectors, item.unified) if mask else None
        if rescale:
            accumulator.add(item.task_vectors, item.unified, masks)
        unified[item.key] = item.unified.cpu()
        if masks is not None:
            packed[item.key] = pack_bits(masks).cpu()
    if rescale:
        values = accumulator.rescalers()
        rescalers = {t: float(v) for t, v in zip(tasks, values, strict=True)}
        empty = [t for t, d in zip(tasks, accumulator.denominator, strict=True) if d == 0]
    else:
        rescalers, empty = {t: 1.0 for t in tasks}, []
    extra = {"empty_mask_tasks": empty} if empty else {}
    return TaskConditionedResult(
        method=method.name,
        params=dict(method.params),
        tasks=tasks,
        pretrained=pool.pretrained,
        unified=unified,
        masks=packed if mask else None,
        rescalers=rescalers,
        copied={k: pool.pretrained.get(k) for k in plan.copied},
        task_specific=task_specific_tensors(pool, plan),
        pretrained_excluded={k: pool.pretrained.get(k) for k in plan.pretrained_excluded},
        extra=extra,
    )
