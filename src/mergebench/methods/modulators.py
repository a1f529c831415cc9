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

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mergebench.methods.base import Method, task_specific_tensors
from mergebench.pool import ModelPool
from mergebench.results import TaskConditionedResult
from mergebench.selection import KeyPlan
from mergebench.tensors import pack_bits

RESCALERS = ("tensor_mean", "global")


def task_masks(
    task_vectors: torch.Tensor, unified: torch.Tensor, scratch: Scratch | None = None
) -> torch.Tensor:
    """`M_t = (tau_t * tau_uni > 0)` as bool `[N, *shape]` (in `scratch` buffers if given)."""
    if scratch is None:
        return task_vectors * unified > 0
    product = scratch.get("product", task_vectors.shape, torch.float32, task_vectors.device)
    masks = scratch.get("masks", task_vectors.shape, torch.bool, task_vectors.device)
    torch.mul(task_vectors, unified, out=product)
    return torch.gt(product, 0, out=masks)


class Scratch:
    """Named work buffers reused from key to key (grown to the largest key): no allocation,
    hence no page faults, per tensor. A buffer is overwritten by the next `get` of its name."""

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < numel or flat.dtype != dtype or flat.device != device:
            flat = torch.empty(numel, dtype=dtype, device=device)
            self._flat[name] = flat
        return flat[:numel].view(shape)


class RescalerAccumulator:
    """Per-task float64 sums of `reduce|tau_t|` and `reduce|M_t * tau_uni|` over tensors.

    Each task's statistic is one float64 reduction over the whole tensor (the official code
    takes `mean(abs(tau_t))` per tensor and task the same way), done in a reused float64
    buffer rather than as a float64 copy of the whole `[N, *shape]` stack.
    """

    def __init__(self, num_tasks: int, mode: str) -> None:
        self.mode = mode
        self.numerator = torch.zeros(num_tasks, dtype=torch.float64)
        self.denominator = torch.zeros(num_tasks, dtype=torch.float64)
        self._scratch = Scratch()

    def add(
        self, task_vectors: torch.Tensor, unified: torch.Tensor, masks: torch.Tensor | None
    ) -> None:
        n = task_vectors.shape[0]
        rows = task_vectors.reshape(n, -1)
        wide = self._scratch.get("f64", rows.shape[1:], torch.float64, rows.device)
        uni_abs = unified.reshape(-1).abs().to(torch.float64)
        reduce = torch.mean if self.mode == "tensor_mean" else torch.sum
        numerator, denominator = [], []
        for t in range(n):
            wide.copy_(rows[t]).abs_()
            numerator.append(reduce(wide))
            if masks is None:
                denominator.append(reduce(uni_abs))
            else:
                torch.mul(uni_abs, masks[t].reshape(-1), out=wide)
                denominator.append(reduce(wide))
        self.numerator += torch.stack(numerator).cpu()
        self.denominator += torch.stack(denominator).cpu()

    def rescalers(self) -> torch.Tensor:
        safe = torch.where(
            self.denominator > 0, self.denominator, torch.ones_like(self.denominator)
        )
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
    scratch = Scratch()
    unified: dict[str, torch.Tensor] = {}
    packed: dict[str, torch.Tensor] = {}
    for item in items:
        masks = task_masks(item.task_vectors, item.unified, scratch) if mask else None
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
