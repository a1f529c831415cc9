"""Model Breadcrumbs: per row, drop the largest outliers and the small entries (methods.md).

Rows are slices along the last dimension (the tensor viewed as `(-1, shape[-1])`; a 1-D
tensor is one row; a 0-D tensor is kept whole); `scope=tensor` makes the whole flattened
tensor one row (mergekit's granularity). Per task and row of `n` entries,
`g = floor(outlier * n)`, `k = floor(density * n)`; the entries ranked `g+1 .. g+k` by
|tau| descending (equal values: lower index first) are kept, the rest set to 0; ranks past
`n` simply do not exist (`g + k > n` keeps `g+1 .. n`). Then
`W = W_pre + scaling * sum_t crumbs(tau_t)`, the sum added in task order.

`scope: tensor` on the CPU takes the keys the stream cuts into row blocks (an LLM's
embedding, output and MLP matrices) in those blocks: `prepare` counts their cuts over the
blocks first (`breadcrumbs_blocks`), so no pass holds a whole big `[N, *shape]` stack.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mergebench.engine import breadcrumbs_kernels
from mergebench.engine.stream import (
    TaskVectorStream,
    TensorItem,
    numpy_kernels,
    sum_tasks,
    thread_scratch,
)
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.breadcrumbs_blocks import KeyCuts, tensor_cuts
from mergebench.methods.options import choice, fraction, number, option


def row_keep_range(n: int, density: float, outlier: float) -> tuple[int, int]:
    """0-based `[start, stop)` of the kept ranks in a row of `n` entries."""
    g = math.floor(outlier * n)
    k = math.floor(density * n)
    return min(g, n), min(g + k, n)


def crumbs(task_vectors: torch.Tensor, density: float, outlier: float) -> torch.Tensor:
    """Breadcrumbs mask applied to a stack `[N, *shape]` of task vectors (one per task).

    Every task's tensor is cut into rows along its last dimension; the mask is computed row
    by row (a stable descending sort of |tau| gives the ranks).
    """
    if task_vectors.dim() == 1:  # 0-D tensors: kept whole
        return task_vectors.clone()
    n = task_vectors.shape[-1]
    start, stop = row_keep_range(n, density, outlier)
    if n == 0 or start >= stop:
        return torch.zeros_like(task_vectors)
    rows = task_vectors.reshape(-1, n)
    order = torch.sort(rows.abs(), dim=-1, descending=True, stable=True).indices
    rank_kept = torch.zeros(n, dtype=torch.bool, device=rows.device)
    rank_kept[start:stop] = True
    keep = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    keep.scatter_(-1, order, rank_kept.expand(rows.shape))
    return (rows * keep).reshape(task_vectors.shape)


# Entries of the `[N, rows, n]` stack masked at a time: the sort's keys and int64 indices
# are that block's size, so a large key (an LLM's embedding) costs one float32 copy (the
# result) beyond the stream's buffers instead of several of the whole stack.
BLOCK_NUMEL = 1 << 20
# Entries per task and block of the CPU kernel (at most): its accumulator stays in L1.
_KERNEL_BLOCK = 1024


class _RankCut:
    """One task's kept ranks `[start, stop)` of a flat tensor as |tau| thresholds.

    With `a` the (start+1)-th and `b` the stop-th largest |tau|, an entry of |tau| `v` has
    0-based rank `(entries > v) + (entries == v before it)`: `b < v < a` is kept, `v > a`
    and `v < b` are not, and an entry equal to `a` or `b` is kept when its rank, counted
    through the ties in index order, lies in `[start, stop)`: the stable sort's rule."""

    def __init__(self, size: torch.Tensor, largest: int) -> None:
        # kthvalue: an exact selection (the k-th smallest), one copy of `size`, no sort.
        value = torch.kthvalue(size, size.numel() + 1 - largest).values
        self.value = float(value)  # |tau| at the cut (a float32 value, exact as a float)
        self.above = int((size > value).sum())  # entries with |tau| > value
        self.seen = 0  # entries equal to `value` in the blocks before this one

    def ranks(self, equal: torch.Tensor) -> torch.Tensor:
        """0-based ranks of the block's entries equal to the cut (`equal`: a 1-D mask)."""
        return self.above + self.seen + torch.cumsum(equal, 0) - 1


def _tensor_scope_kernel(
    task_vectors: torch.Tensor,
    density: float,
    outlier: float,
    scaling: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`scope: tensor` on the CPU, bit for bit `_tensor_scope_delta`: each task's two cuts
    from the radix select (one counting pass over the stack for both cuts' high bits, one
    for their low bits), then one compiled pass that masks, sums and scales into `out`
    (float32, the key's shape; fresh if None). No copy of the stack, no sort."""
    tasks = task_vectors.shape[0]
    n = task_vectors[0].numel()
    start, stop = row_keep_range(n, density, outlier)
    if out is None:
        out = torch.empty(task_vectors.shape[1:], dtype=torch.float32)
    if n == 0 or start >= stop:
        return out.zero_().mul_(scaling)  # as the torch path: 0 * scaling (-0.0 if < 0)
    flat = task_vectors.reshape(tasks, n).numpy()
    cut_bits, above = breadcrumbs_kernels.rank_cuts(flat, start, stop)
    ranges = breadcrumbs_kernels.tie_ranges(flat, cut_bits, above, start, stop)
    block = max(1, min(_KERNEL_BLOCK, BLOCK_NUMEL // tasks))
    # torch scales float32 by float32(scaling)
    breadcrumbs_kernels.mask_sum(flat, cut_bits, ranges, np.float32(scaling), block,
                                 out.view(-1).numpy())  # fmt: skip
    return out


def _tensor_scope_delta(task_vectors: torch.Tensor, density: float, outlier: float,
                        scaling: float) -> torch.Tensor:  # fmt: skip
    """`scope: tensor` without sorting the tensor: each task's two cuts come from exact
    selections on its |tau| (one task at a time: two working copies of one task's tensor),
    then the mask is applied in blocks in flat order. Bit-identical to masking with a stable
    sort of the whole tensor (which held the stack's |tau|, sorted values, int64 indices).
    The GPU path (and `$MERGEBENCH_TORCH_KERNELS=1`): it always gets whole keys, big ones
    included (no counting passes over row blocks, as the CPU kernel has)."""
    tasks = task_vectors.shape[0]
    flat = task_vectors.reshape(tasks, -1)
    n = flat.shape[1]
    start, stop = row_keep_range(n, density, outlier)
    if n == 0 or start >= stop:
        return torch.zeros(task_vectors.shape[1:], dtype=task_vectors.dtype,
                           device=flat.device).mul_(scaling)  # fmt: skip
    cuts = []
    for tau in flat:
        size = tau.abs()
        cuts.append((_RankCut(size, start + 1), _RankCut(size, stop)))
        del size
    out = torch.empty(task_vectors.shape[1:], dtype=task_vectors.dtype, device=flat.device)
    result = out.view(-1)
    per = max(1, BLOCK_NUMEL // tasks)
    for first in range(0, n, per):
        chunk = flat[:, first : first + per]
        masked = torch.empty_like(chunk)
        for t, (upper, lower) in enumerate(cuts):
            size = chunk[t].abs()
            keep = (size <= upper.value) & (size >= lower.value)
            for cut in (upper, lower) if upper.value != lower.value else (upper,):
                equal = size == cut.value
                ties = int(equal.sum())
                if ties:
                    ranks = cut.ranks(equal)
                    keep &= ~equal | ((ranks >= start) & (ranks < stop))
                    cut.seen += ties
            torch.mul(chunk[t], keep, out=masked[t])
        sum_tasks(masked, out=result[first : first + per])
    return out.mul_(scaling)


def _kernel_handles(task_vectors: torch.Tensor) -> bool:
    return (
        numpy_kernels(task_vectors)
        and task_vectors.dtype == torch.float32
        and task_vectors.is_contiguous()
    )


def breadcrumbs_delta(
    task_vectors: torch.Tensor,
    density: float,
    outlier: float,
    scaling: float,
    scope: str = "row",
) -> torch.Tensor:
    """`scaling * sum_t crumbs(tau_t)` for one key (float32 in, float32 out), computed in
    blocks of rows (each entry's value does not depend on the blocks)."""
    if scope == "tensor" and task_vectors.dim() > 1:  # mergekit's: the tensor is one row
        if _kernel_handles(task_vectors):
            return _tensor_scope_kernel(task_vectors, density, outlier, scaling)
        return _tensor_scope_delta(task_vectors, density, outlier, scaling)
    if task_vectors.dim() == 1 or task_vectors.numel() == 0:
        return scaling * sum_tasks(crumbs(task_vectors, density, outlier))
    n = task_vectors.shape[-1]
    stack = task_vectors.reshape(task_vectors.shape[0], -1, n)
    out = torch.empty(task_vectors.shape[1:], dtype=task_vectors.dtype, device=stack.device)
    rows = out.view(-1, n)
    per = max(1, BLOCK_NUMEL // (n * stack.shape[0]))
    for start in range(0, rows.shape[0], per):
        sum_tasks(crumbs(stack[:, start : start + per], density, outlier),
                  out=rows[start : start + per])  # fmt: skip
    return out.mul_(scaling)


class Breadcrumbs(TaskVectorMethod):
    name = "breadcrumbs"
    post_scaling = "scaling"

    density: float = option(fraction)
    outlier: float = option(fraction, low_open=False, high_open=True)
    scaling: float = option(number)
    scope: str = option(choice, allowed=("row", "tensor"))

    def setup(self) -> None:
        self._cuts: dict[str, KeyCuts] = {}

    def prepare(self, stream: TaskVectorStream) -> None:
        """`scope: tensor` on the CPU kernel: the cuts of the keys the stream cuts into row
        blocks, from counting passes over those keys (`breadcrumbs_blocks`), so that the
        merge pass takes them in blocks too (bit for bit the whole-key result)."""
        self._cuts = {}
        if self.scope == "tensor" and stream.device.type == "cpu" and numpy_kernels(_CPU):
            self._cuts = tensor_cuts(
                stream, lambda n: row_keep_range(n, self.density, self.outlier), self.name
            )

    def splits_rows(self) -> bool:
        # Masks are per row along the last dimension: a block of whole first-axis rows
        # holds whole rows. `scope: tensor` ranks the whole tensor: its blocks need the cuts
        # `prepare` counted (the CPU kernel); else whole keys.
        return self.scope == "row" or bool(self._cuts)

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return breadcrumbs_delta(task_vectors, self.density, self.outlier, self.scaling, self.scope)

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        """`scope: tensor` on the CPU writes into the worker's reused buffer (a fresh one per
        key above glibc's mmap threshold would fault in new pages every time); the driver
        adds it to the output before the worker takes its next item."""
        taus = item.task_vectors
        if self.scope == "tensor" and item.rows is not None:
            return self._tensor_block(item)
        if not (self.scope == "tensor" and taus.dim() > 1 and _kernel_handles(taus)):
            return self.merge_task_vectors(item.key, taus)
        out = thread_scratch().get("breadcrumbs delta", taus.shape[1:], torch.float32, taus.device)
        return _tensor_scope_kernel(taus, self.density, self.outlier, self.scaling, out)

    def _tensor_block(self, item: TensorItem) -> torch.Tensor:
        """`scope: tensor` on a row block of a big key: the key's cuts from `prepare`, the
        tie ranges counted from the ties before the block; the same compiled mask_sum."""
        taus = item.task_vectors.contiguous()
        cuts = self._cuts[item.key]
        out = thread_scratch().get("breadcrumbs delta", taus.shape[1:], torch.float32, taus.device)
        if cuts.cut_bits is None:  # no rank kept: as the whole key, 0 * scaling
            return out.zero_().mul_(self.scaling)
        tasks, first_row = taus.shape[0], item.rows[0] if item.rows else 0
        flat = taus.reshape(tasks, -1).numpy()
        above = cuts.block_above(first_row)
        ranges = breadcrumbs_kernels.tie_ranges(flat, cuts.cut_bits, above, cuts.start, cuts.stop)
        block = max(1, min(_KERNEL_BLOCK, BLOCK_NUMEL // tasks))
        breadcrumbs_kernels.mask_sum(flat, cuts.cut_bits, ranges, np.float32(self.scaling), block,
                                     out.view(-1).numpy())  # fmt: skip
        return out


# A CPU tensor, to ask `numpy_kernels` whether the CPU kernels run (the environment may say no).
_CPU = torch.empty(0)
