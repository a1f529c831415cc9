"""Mask & Rescale against a unified task vector: shared by EMR and "X w/ M&R".

- Mask: `M_t = 1` where `tau_t` and `tau_uni` are both non-zero with the same sign, one bit
  per entry per task (stored bit-packed). Signs are compared (`sgn(tau_t) * sgn(tau_uni) > 0`),
  never the product `tau_t * tau_uni`, which underflows to 0 in float32 for tiny entries.
- Rescale: one scalar per task,
  `tensor_mean`: `lam_t = sum_tensors mean|tau_t| / sum_tensors mean|M_t * tau_uni|`;
  `global`:      `lam_t = sum|tau_t| / sum|M_t * tau_uni|` over all merged entries.
  Sums are accumulated in float64. Where the denominator is 0 (the task's mask keeps
  nothing), `M_t * tau_uni` is 0 everywhere, so `lam_t` cannot change the weights; we
  store 0 and say so in the result's `extra`.

Each key is reduced by `modulate_key` to its unified vector, packed masks and per-task
statistics; per-key statistics are added up in key order, so the result does not depend
on how many keys were processed at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mergebench.engine import kernels
from mergebench.engine.bits import pack_bits
from mergebench.engine.keyplan import KeyPlan
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import (
    Scratch,
    TaskVectorStream,
    TensorItem,
    numpy_kernels,
    thread_scratch,
)
from mergebench.methods.base import Method, task_specific_tensors
from mergebench.results import ArtifactTarget, LazyTensors, TaskConditionedResult
from mergebench.results.shards import Entry, ShardedWriter, writing

RESCALERS = ("tensor_mean", "global")


def task_masks(
    task_vectors: torch.Tensor, unified: torch.Tensor, scratch: Scratch | None = None
) -> torch.Tensor:
    """`M_t = (sgn(tau_t) * sgn(tau_uni) > 0)` as bool `[N, *shape]` (in `scratch` buffers if
    given). Signs are exactly -1, 0 or 1, so their product never underflows.

    With scratch, one task row at a time: the float product never exists for all N rows.
    """
    unified_sign = torch.sign(unified)
    if scratch is None:
        return torch.sign(task_vectors) * unified_sign > 0
    device = task_vectors.device
    masks = scratch.get("masks", task_vectors.shape, torch.bool, device)
    product = scratch.get("product", unified.shape, torch.float32, device)
    for row, mask in zip(task_vectors, masks, strict=True):
        torch.sign(row, out=product).mul_(unified_sign)
        torch.gt(product, 0, out=mask)
    return masks


@dataclass
class KeyModulators:
    """What one key contributes to a task-conditioned result."""

    unified: torch.Tensor  # float32 [*shape], on the CPU
    packed: torch.Tensor | None  # uint8 [N, ceil(numel/8)], on the CPU; None = no masks
    numerator: torch.Tensor  # float64 [N]: reduce|tau_t| over this key
    denominator: torch.Tensor  # float64 [N]: reduce|M_t * tau_uni| over this key
    rows: tuple[int, int] | None = None  # a row block of the key (`TensorItem.rows`), or all


# `elect` of `modulate_key`: the CPU kernel's election of `tau_uni` (EMR's `magnitude`).
_ELECTIONS = {"max": kernels.ELECT_MAX, "sum": kernels.ELECT_SUM}


def modulate_key(
    task_vectors: torch.Tensor,
    unified: torch.Tensor | None,
    mask: bool,
    rescaler: str,
    scratch: Scratch | None = None,
    rescale: bool = True,
    elect: str | None = None,
    rows: tuple[int, int] | None = None,
    size: int | None = None,
) -> KeyModulators:
    """Masks (packed) and the rescaler statistics (if `rescale`) of one key, or of the row
    block `rows` of a key of `size` entries (a `tensor_mean` statistic is divided by the
    whole key's size, so the blocks' statistics add up to the key's).

    Every statistic is a float64 sum over the whole tensor for one task (divided by its
    size for `tensor_mean`), as the official code takes `mean(abs(tau_t))` per tensor and
    task. On the CPU this is one compiled pass (`_modulate_blocks`); elsewhere (GPU) in
    torch. Both give the same masks; the float64 sums agree to rounding.
    On the CPU, `unified` may be None and elected in that pass from the task vectors
    (`elect`: EMR's `magnitude`, "max" or "sum").
    """
    if numpy_kernels(task_vectors):
        out = _modulate_blocks(task_vectors, unified, mask, rescaler, rescale, elect, size)
    elif unified is None:
        raise ValueError("modulate_key: the torch (GPU) path needs `unified`")
    else:
        out = _modulate_torch(task_vectors, unified, mask, rescaler, scratch, rescale, size)
    out.rows = rows
    return out


# Entries per block of the float64 sums (they are added block by block): a multiple of 8
# lets each block's masks be bit-packed on their own.
SUM_BLOCK = 1 << 15


def _modulate_blocks(
    task_vectors: torch.Tensor,
    unified: torch.Tensor | None,
    mask: bool,
    rescaler: str,
    rescale: bool,
    elect: str | None = None,
    size: int | None = None,
) -> KeyModulators:
    """CPU kernel: `kernels.modulate`, one pass over the task rows (releases the GIL, so
    worker threads run in parallel)."""
    n = task_vectors.shape[0]
    taus = np.ascontiguousarray(task_vectors.reshape(n, -1).numpy())
    code = kernels.ELECT_NONE
    if unified is None:
        if elect not in _ELECTIONS:
            raise ValueError("modulate_key: give `unified`, or `elect` ('max' or 'sum')")
        unified = torch.empty(task_vectors.shape[1:], dtype=torch.float32)
        code = _ELECTIONS[elect]
    uni = unified.reshape(-1).numpy()
    numel = uni.shape[0]
    packed = np.empty((n, (numel + 7) // 8 if mask else 0), dtype=np.uint8)
    numerator = np.zeros(n)
    denominator = np.zeros(n)
    if code == kernels.ELECT_NONE:
        uni = np.ascontiguousarray(uni)
    kernels.modulate(taus, uni, code, mask, rescale, SUM_BLOCK, packed, numerator, denominator)
    if rescaler == "tensor_mean" and numel:
        numerator /= size or numel
        denominator /= size or numel
    return KeyModulators(
        unified=unified,
        packed=torch.from_numpy(packed) if mask else None,
        numerator=torch.from_numpy(numerator),
        denominator=torch.from_numpy(denominator),
    )


def _modulate_torch(
    task_vectors: torch.Tensor,
    unified: torch.Tensor,
    mask: bool,
    rescaler: str,
    scratch: Scratch | None,
    rescale: bool,
    size: int | None = None,
) -> KeyModulators:
    """Device-agnostic kernel (the GPU path): whole rows, float64 reductions in torch."""
    scratch = scratch if scratch is not None else Scratch()
    device = task_vectors.device
    n = task_vectors.shape[0]
    masks = task_masks(task_vectors, unified, scratch) if mask else None
    rows = task_vectors.reshape(n, -1)
    flat_unified = unified.reshape(-1)
    numel = flat_unified.numel()
    numerator = torch.zeros(n, dtype=torch.float64, device=device)
    denominator = torch.zeros(n, dtype=torch.float64, device=device)
    if rescale and numel:
        wide = scratch.get("float64", flat_unified.shape, torch.float64, device)
        unified_abs = torch.abs(flat_unified).to(torch.float64)
        for t in range(n):
            numerator[t] = wide.copy_(rows[t]).abs_().sum()
            denominator[t] = (
                unified_abs.sum()
                if masks is None
                else torch.mul(unified_abs, masks[t].reshape(-1), out=wide).sum()
            )
        if rescaler == "tensor_mean":
            numerator /= size or numel
            denominator /= size or numel
    return KeyModulators(
        unified=unified.cpu(),
        packed=pack_bits(masks).cpu() if masks is not None else None,
        numerator=numerator.cpu(),
        denominator=denominator.cpu(),
    )


class RescalerAccumulator:
    """Per-task float64 sums of the per-key statistics, added in key order."""

    def __init__(self, num_tasks: int, mode: str) -> None:
        self.mode = mode
        self.numerator = torch.zeros(num_tasks, dtype=torch.float64)
        self.denominator = torch.zeros(num_tasks, dtype=torch.float64)

    def add_key(self, key: KeyModulators) -> None:
        self.numerator += key.numerator
        self.denominator += key.denominator

    def rescalers(self) -> torch.Tensor:
        safe = torch.where(
            self.denominator > 0, self.denominator, torch.ones_like(self.denominator)
        )
        return torch.where(self.denominator > 0, self.numerator / safe, torch.zeros_like(safe))


def stream_mask_and_rescale(
    method: Method,
    pool: ModelPool,
    stream: TaskVectorStream,
    unify: Callable[[TensorItem], torch.Tensor],
    mask: bool,
    rescale: bool,
    rescaler: str,
    target: ArtifactTarget | None,
) -> TaskConditionedResult:
    """The fast path: `unify(item)` gives each key's `tau_uni`; keys run in parallel."""

    def per_key(item: TensorItem) -> KeyModulators:
        unified = unify(item)
        return modulate_key(item.task_vectors, unified, mask, rescaler, thread_scratch(), rescale)

    return assemble_result(
        method, pool, stream.plan, stream.map(per_key, method.name), mask, rescale, rescaler, target
    )


def assemble_result(
    method: Method,
    pool: ModelPool,
    plan: KeyPlan,
    keys: Iterable[tuple[str, KeyModulators]],
    mask: bool,
    rescale: bool,
    rescaler: str,
    target: ArtifactTarget | None,
) -> TaskConditionedResult:
    """The task-conditioned result from per-key modulators, added up in key order; with
    `target`, written into that artifact key by key (`RunContext.target`)."""
    tasks = pool.tasks
    accumulator = RescalerAccumulator(len(tasks), rescaler)
    unified: Mapping[str, torch.Tensor]
    packed: Mapping[str, torch.Tensor]
    if target is None:
        unified, packed = {}, {}
        for key, modulators in keys:
            accumulator.add_key(modulators)
            if modulators.rows is None:
                unified[key] = modulators.unified
                if modulators.packed is not None:
                    packed[key] = modulators.packed
            else:
                _place_block(pool, key, modulators, unified, packed)
    else:  # written into the artifact key by key, in key order
        unified, packed = _stream_modulators(target, pool, plan, keys, accumulator, mask)
    return conditioned_result(method, pool, plan, unified, packed, accumulator, mask, rescale)


def conditioned_result(
    method: Method,
    pool: ModelPool,
    plan: KeyPlan,
    unified: Mapping[str, torch.Tensor],
    packed: Mapping[str, torch.Tensor],
    accumulator: RescalerAccumulator,
    mask: bool,
    rescale: bool,
    digest: Callable[[], str] | None = None,
) -> TaskConditionedResult:
    """The task-conditioned result once every key's modulators are in (`accumulator` has
    added up the rescaler statistics); `digest`: the pretrained digest, being computed."""
    tasks = pool.tasks
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
        digest=digest,
    )


def modulator_writers(
    target: ArtifactTarget, pool: ModelPool, plan: KeyPlan, mask: bool
) -> tuple[ShardedWriter, ShardedWriter | None]:
    """The artifact's writers of the unified vector and (with `mask`) the packed masks."""
    pre, n = pool.pretrained, len(pool.tasks)
    shapes = {k: tuple(pre.shape(k)) for k in plan.merged}
    unified = target.writer("unified", [Entry(k, s, torch.float32) for k, s in shapes.items()])
    masks = None
    if mask:
        masks = target.writer(
            "masks",
            [Entry(k, (n, math.ceil(math.prod(s) / 8)), torch.uint8) for k, s in shapes.items()],
            metadata={"tasks": json.dumps(pool.tasks)},
        )
    return unified, masks


def _stream_modulators(
    target: ArtifactTarget,
    pool: ModelPool,
    plan: KeyPlan,
    keys: Iterable[tuple[str, KeyModulators]],
    accumulator: RescalerAccumulator,
    mask: bool,
) -> tuple[LazyTensors, Mapping[str, torch.Tensor]]:
    shapes = {k: tuple(pool.pretrained.shape(k)) for k in plan.merged}
    unified, masks = modulator_writers(target, pool, plan, mask)
    with writing(unified, masks):
        for key, modulators in keys:
            accumulator.add_key(modulators)
            if modulators.rows is None:
                unified.write(key, modulators.unified)
                if masks is not None:
                    masks.write(key, modulators.packed)
                continue
            start, row = modulators.rows[0], math.prod(shapes[key][1:])
            unified.write_rows(key, modulators.unified, start)
            if masks is not None:  # a block holds a multiple of 8 entries: whole bytes
                masks.write_columns(key, modulators.packed, start * row // 8)
    return target.tensors("unified"), target.tensors("masks") if mask else {}


def _place_block(
    pool: ModelPool,
    key: str,
    block: KeyModulators,
    unified: dict[str, torch.Tensor],
    packed: dict[str, torch.Tensor],
) -> None:
    """Copy a row block's unified vector and packed masks into the key's whole tensors."""
    shape = tuple(pool.pretrained.shape(key))
    start, stop = block.rows
    if key not in unified:
        unified[key] = torch.empty(shape, dtype=torch.float32)
    unified[key][start:stop] = block.unified
    if block.packed is not None:
        if key not in packed:
            packed[key] = torch.empty((len(pool.tasks), math.ceil(math.prod(shape) / 8)),
                                      dtype=torch.uint8)  # fmt: skip
        first = start * math.prod(shape[1:]) // 8
        packed[key][:, first : first + block.packed.shape[1]] = block.packed
