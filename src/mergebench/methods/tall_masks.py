"""TALL masks: task-conditioned `W_t = W_pre + m_t * tau_MTL` (methods.md, nik-dim/tall_masks).

1. `tau_MTL`, unscaled: `task_arithmetic` = `sum_t tau_t` (task order); `ties` = TIES with
   `k=0.2`, `topk_scope=global`, `aggregate=sum`, before its scaling (`methods/ties.py`).
2. `m_t = |tau_t| > threshold_t * |tau_MTL - tau_t|` (strict), one bit per entry per task.
3. The result is a `TaskConditionedResult` like EMR's: `unified = tau_MTL`, bit-packed
   masks, every rescaler 1.0 (so `TaskSwitcher` and `state_dict(task)` serve it as is).

`threshold` is one number for every task, or a mapping `{task: number}` naming exactly the
pool's tasks. Consensus merging (`methods/consensus.py`) and LiNeS reuse these pieces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergebench.engine.bits import pack_bits
from mergebench.engine.keyplan import plan_keys
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TaskVectorStream, TensorItem, sum_tasks
from mergebench.methods.base import DEFAULT_CONTEXT, Method, RunContext
from mergebench.methods.modulators import KeyModulators, assemble_result
from mergebench.methods.options import choice, number, option
from mergebench.methods.ties import Ties
from mergebench.results import TaskConditionedResult
from mergebench.util.errors import MergeBenchError

BASES = ("task_arithmetic", "ties")
# TIES as the TALL-masks code runs it for tau_MTL: top 20% per task over the whole model,
# elected, "dis-sum", unscaled.
TIES_K = 0.2

Threshold = float | dict[str, float]


def parse_threshold(name: str, option: str, value: Any) -> Threshold:
    """One finite number >= 0, or a mapping of task names to such numbers."""
    if isinstance(value, Mapping):
        if not value:
            raise MergeBenchError(f"{name}.{option}: the per-task mapping is empty")
        return {str(t): _one_threshold(name, f"{option}[{t}]", v) for t, v in value.items()}
    return _one_threshold(name, option, value)


def _one_threshold(name: str, option: str, value: Any) -> float:
    if isinstance(value, bool):
        raise MergeBenchError(f"{name}.{option}: {value!r} is not a number")
    result = number(name, option, value)
    if not (math.isfinite(result) and result >= 0):
        raise MergeBenchError(f"{name}.{option}: {value!r} must be a finite number >= 0")
    return result


def task_thresholds(name: str, threshold: Threshold, tasks: Sequence[str]) -> list[float]:
    """Per-task thresholds in task order; a mapping must name exactly `tasks`."""
    if not isinstance(threshold, dict):
        return [threshold] * len(tasks)
    missing = [t for t in tasks if t not in threshold]
    extra = [t for t in threshold if t not in tasks]
    if missing or extra:
        problem = f"lacks task {missing[0]!r}" if missing else f"names unknown task {extra[0]!r}"
        raise MergeBenchError(
            f"{name}.threshold: the per-task mapping {problem} (the pool's tasks: {list(tasks)})"
        )
    return [threshold[t] for t in tasks]


def base_ties() -> Ties:
    """The TIES merge whose unscaled vector is `tau_MTL` for `base=ties`."""
    return Ties(k=TIES_K, scaling=1.0, aggregate="sum", topk_scope="global")


def multitask_vector(
    key: str,
    task_vectors: torch.Tensor,
    base: str,
    ties: Ties | None = None,
    task_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """`tau_MTL` of one key as a new float32 tensor (never one of the stream's buffers).

    `task_sum`, if given, is `sum_t tau_t` already added in task order (the stream's).
    """
    if base == "task_arithmetic":
        return task_sum.clone() if task_sum is not None else sum_tasks(task_vectors)
    assert ties is not None, "base=ties needs a prepared Ties (prepare_base)"
    # scaling=1.0: `1 * x` is exact, so this is TIES' merged vector before its scaling.
    return ties.merge_task_vectors(key, task_vectors)


def tall_masks(
    task_vectors: torch.Tensor, multitask: torch.Tensor, thresholds: Sequence[float]
) -> torch.Tensor:
    """bool `[N, *shape]`: `m_t = |tau_t| > threshold_t * |tau_MTL - tau_t|`, task by task."""
    masks = torch.empty(task_vectors.shape, dtype=torch.bool, device=task_vectors.device)
    for tau, threshold, mask in zip(task_vectors, thresholds, masks, strict=True):
        torch.gt(tau.abs(), threshold * (multitask - tau).abs(), out=mask)
    return masks


def prepare_base(base: str, stream: TaskVectorStream) -> Ties | None:
    """The global pass(es) `base` needs before per-key work (TIES' global top-k, on the
    stream's device and progress display)."""
    if base != "ties":
        return None
    ties = base_ties()
    ties.prepare(stream)
    return ties


class TallMasks(Method):
    name = "tall_masks"
    task_conditioned = True

    base: str = option(choice, allowed=BASES)
    threshold: Threshold = option(parse_threshold, record_checked=True)

    def merge(
        self, pool: ModelPool, context: RunContext = DEFAULT_CONTEXT
    ) -> TaskConditionedResult:
        thresholds = task_thresholds(self.name, self.threshold, pool.tasks)
        stream = TaskVectorStream(pool, plan_keys(pool), device=context.device,
                                  progress=context.progress)  # fmt: skip
        ties = prepare_base(self.base, stream)
        n = len(pool.tasks)
        zeros = torch.zeros(n, dtype=torch.float64)

        def per_key(item: TensorItem) -> KeyModulators:
            multitask = multitask_vector(
                item.key, item.task_vectors, self.base, ties, item.task_sum()
            )
            masks = tall_masks(item.task_vectors, multitask, thresholds)
            return KeyModulators(
                unified=multitask.cpu(),
                packed=pack_bits(masks).cpu(),
                numerator=zeros,
                denominator=zeros,
            )

        keys = stream.map(per_key, self.name)
        # rescale=False: every rescaler is 1.0, so task t gets W_pre + m_t * tau_MTL.
        return assemble_result(
            self,
            pool,
            stream.plan,
            keys,
            mask=True,
            rescale=False,
            rescaler="tensor_mean",
            target=context.target,
        )
