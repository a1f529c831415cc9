"""TIES-Merging: trim, elect sign, disjoint merge, then `W_pre + lam * tau_m` (methods.md).

Trim keeps, per task, the entries whose |value| is at least the `keep`-th largest, with
`keep = max(1, floor(k * n + 0.5))` over `n` entries: over all merged tensors of the task
together (`topk_scope=global`, exact even when streamed: two counting passes of a radix
select, see `mergebench.engine.topk`) or per tensor (`tensor`).

Sums over tasks are added in task order (`sum_tasks`), so a streamed merge is bit-identical
to an in-memory one. On the CPU the per-key arithmetic runs block by block in numpy
(`_merge_blocks`); `trim` and `elect_and_disjoint_merge` are the same arithmetic in torch
(the GPU path, and what the tests hold the numpy kernel to).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mergebench.engine.stream import (
    Scratch,
    TaskVectorStream,
    numpy_kernels,
    sum_tasks,
    thread_scratch,
)
from mergebench.engine.topk import RadixSelect, kth_largest_abs_in_tensor
from mergebench.methods.base import TaskVectorMethod, sign
from mergebench.methods.options import choice, fraction, number, option

AGGREGATES = ("sum", "mean")
# Entries per block of the CPU kernel: the `[N, block]` work arrays stay in the core's cache.
_BLOCK = 1 << 15


def keep_count(k: float, n: int) -> int:
    return max(1, math.floor(k * n + 0.5))


def trim(task_vectors: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry whose |value| is below its task's threshold (ties at it are kept)."""
    shape = (-1,) + (1,) * (task_vectors.dim() - 1)
    keep = task_vectors.abs() >= thresholds.reshape(shape).to(task_vectors.device)
    return task_vectors * keep


def elect_and_disjoint_merge(trimmed: torch.Tensor, aggregate: str) -> torch.Tensor:
    """`gamma = sgn(sum_t trimmed_t)`; combine the non-zero entries that agree with gamma."""
    gamma = sign(sum_tasks(trimmed))
    agree = trimmed * gamma > 0
    total = sum_tasks(trimmed * agree)
    if aggregate == "sum":
        return total
    count = agree.sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _merge_blocks(
    task_vectors: torch.Tensor,
    thresholds: torch.Tensor,
    aggregate: str,
    scaling: float,
    scratch: Scratch,
) -> torch.Tensor:
    """`scaling * elect_and_disjoint_merge(trim(taus, thresholds))`, bit for bit, on the CPU.

    One cache-sized block of entries at a time with numpy ufuncs, whose comparisons are
    vectorized where torch's are not (and which release the GIL, so keys run in parallel).
    """
    n = task_vectors.shape[0]
    taus = task_vectors.reshape(n, -1).numpy()
    numel = taus.shape[1]
    thresholds_np = thresholds.to(torch.float32).reshape(n, 1).cpu().numpy()
    out = np.empty(numel, dtype=np.float32)
    block = max(1, min(_BLOCK, numel))
    cpu = torch.device("cpu")
    trimmed = scratch.get("ties_trimmed", (n, block), torch.float32, cpu).numpy()
    work = scratch.get("ties_work", (n, block), torch.float32, cpu).numpy()
    flags = scratch.get("ties_flags", (n, block), torch.bool, cpu).numpy()
    positive = scratch.get("ties_positive", (block,), torch.bool, cpu).numpy()
    gamma = scratch.get("ties_gamma", (block,), torch.float32, cpu).numpy()
    for start in range(0, numel, block):
        stop = min(numel, start + block)
        width = stop - start
        t, o = taus[:, start:stop], out[start:stop]
        tr, wk, fl = trimmed[:, :width], work[:, :width], flags[:, :width]
        pos, g = positive[:width], gamma[:width]
        np.greater_equal(np.abs(t, out=tr), thresholds_np, out=fl)  # trim: |tau| >= threshold
        np.multiply(t, fl, out=tr)
        np.add.reduce(tr, axis=0, out=o)  # elect: gamma = +1 where the sum is > 0, else -1
        np.greater(o, 0, out=pos)
        np.subtract(np.multiply(pos, np.float32(2), out=g), np.float32(1), out=g)
        np.greater(np.multiply(tr, g, out=wk), 0, out=fl)  # agree: trimmed * gamma > 0
        np.add.reduce(np.multiply(tr, fl, out=wk), axis=0, out=o)  # disjoint sum, task order
        if aggregate == "mean":
            count = np.add.reduce(fl, axis=0, dtype=np.int64)
            np.divide(o, np.maximum(count, 1).astype(np.float32), out=o)
            o[count == 0] = 0.0
    np.multiply(out, np.float32(scaling), out=out)  # torch scales float32 by float32(scaling)
    return torch.from_numpy(out).view(task_vectors.shape[1:])


class Ties(TaskVectorMethod):
    name = "ties"
    post_scaling = "scaling"

    k: float = option(fraction)
    scaling: float = option(number)
    aggregate: str = option(choice, allowed=AGGREGATES)
    topk_scope: str = option(choice, allowed=("global", "tensor"))

    def setup(self) -> None:
        self._thresholds: torch.Tensor | None = None

    def prepare(self, stream: TaskVectorStream) -> None:
        """Global scope: the exact per-task threshold over all merged tensors (two passes)."""
        if self.topk_scope != "global":
            return
        n = sum(stream.numel(key) for key in stream.plan.merged)
        select = RadixSelect([keep_count(self.k, n)] * len(stream.tasks))
        for _, counts in stream.map(
            lambda item: select.high_counts(item.task_vectors), f"{self.name}: top-k 1/2", True
        ):
            select.add_high(counts)
        select.targets()  # computed once, before the workers read them
        for _, counts in stream.map(
            lambda item: select.low_counts(item.task_vectors), f"{self.name}: top-k 2/2", True
        ):
            select.add_low(counts)
        self._thresholds = select.values()

    def splits_rows(self) -> bool:
        # A global threshold is known before the merge pass; a per-tensor one needs the key.
        return self.topk_scope == "global"

    def thresholds_for(self, task_vectors: torch.Tensor) -> torch.Tensor:
        if self.topk_scope == "global":
            assert self._thresholds is not None, "prepare() computes the global thresholds"
            return self._thresholds
        keep = keep_count(self.k, task_vectors[0].numel())
        return torch.stack([kth_largest_abs_in_tensor(tau, keep) for tau in task_vectors])

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        thresholds = self.thresholds_for(task_vectors)
        if numpy_kernels(task_vectors) and task_vectors.is_contiguous():
            return _merge_blocks(
                task_vectors, thresholds, self.aggregate, self.scaling, thread_scratch()
            )
        trimmed = trim(task_vectors, thresholds)
        return self.scaling * elect_and_disjoint_merge(trimmed, self.aggregate)
