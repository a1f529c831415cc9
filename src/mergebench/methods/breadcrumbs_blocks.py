"""Breadcrumbs' `scope: tensor` cuts of the keys the stream cuts into row blocks, from
counting passes over those blocks (before the merge pass), so that the merge pass, too, can
take them block by block instead of holding whole `[N, *shape]` stacks of an LLM's
embedding and output matrices.

The whole-key kernel (`breadcrumbs._tensor_scope_kernel`) counts in memory what is counted
here over the stream: per key and task, the high 16 bits of |tau| (pass 1), the low 16 bits
in each cut's bin (pass 2; `breadcrumbs_kernels.rank_cuts`' two counting passes), giving the
same two cuts and counts above them. An entry equal to a cut is kept by its rank among the
key's equal entries in flat order; where that decides (some, not all, of a cut's ties are
kept) each block's ties are read from its own pass-2 histogram (kept for the key's blocks
while they fit `HELD_HISTOGRAM_BYTES`; else pass 3 counts them), and a block's tie ranges
start from the ties before it: the same entries as the whole key's `tie_ranges`. Histograms
live for one key at a time (blocks come in key order): memory does not grow with the
number of keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mergebench.engine import breadcrumbs_kernels, kernels
from mergebench.engine.stream import TaskVectorStream, TensorItem
from mergebench.engine.topk import per_key_totals

_BINS = 1 << 16
# Bytes of one key's per-block low-bits histograms (2 x tasks x 65,536 int64 per block) kept
# through pass 2 so that its blocks' ties need no pass 3: TinyLlama's embedding (16 blocks, 3
# tasks) takes 48 MiB; a key with more blocks (or tasks) gets pass 3 instead.
HELD_HISTOGRAM_BYTES = 64 << 20


@dataclass
class KeyCuts:
    """One split key's kept ranks `[start, stop)` and each task's two cuts (`cut_bits`,
    None when no rank is kept), with the ties before each block (row start -> int64
    `[2, N]`; absent: none that matter)."""

    start: int
    stop: int
    cut_bits: np.ndarray | None = None  # uint32 [2, N]
    above: np.ndarray | None = None  # int64 [2, N]
    ties_before: dict[int, np.ndarray] = field(default_factory=dict)

    def block_above(self, first_row: int) -> np.ndarray:
        """The counts `tie_ranges` takes for the block from `first_row`: the entries above
        each cut plus the cut's ties in the blocks before (their ranks come first)."""
        assert self.above is not None
        before = self.ties_before.get(first_row)
        return self.above if before is None else self.above + before


def _bits(item: TensorItem) -> np.ndarray:
    taus = item.task_vectors.contiguous()
    return taus.reshape(taus.shape[0], -1).numpy().view(np.uint32)


def tensor_cuts(
    stream: TaskVectorStream, keep_range: Callable[[int], tuple[int, int]], name: str
) -> dict[str, KeyCuts]:
    """`KeyCuts` of every key `stream.map(..., row_blocks=True)` cuts into blocks, from two
    passes over those keys only (three for keys whose blocks' histograms are too many to
    keep); `keep_range(numel)` gives a key's `[start, stop)`."""
    split = stream.split_keys()
    cuts = {}
    for key in split:
        start, stop = keep_range(stream.numel(key))
        cuts[key] = KeyCuts(start, stop)
    counted = {key for key, c in cuts.items() if c.start < c.stop}
    if not counted:
        return cuts
    tasks = len(stream.tasks)
    tops: dict[str, np.ndarray] = {}
    higher: dict[str, np.ndarray] = {}

    def high(item: TensorItem) -> np.ndarray:
        counts = np.zeros((tasks, _BINS), dtype=np.int64)
        kernels.high_counts(_bits(item), counts)
        return counts

    passes = stream.map(high, f"{name}: cuts 1/2", row_blocks=True, keys=counted)
    for key, counts in per_key_totals(passes):
        tops[key], higher[key] = breadcrumbs_kernels.cut_bins(counts, cuts[key].start,
                                                              cuts[key].stop)  # fmt: skip

    def low(item: TensorItem) -> tuple[int, np.ndarray]:
        counts = np.zeros((2, tasks, _BINS), dtype=np.int64)
        breadcrumbs_kernels.low_counts_two(_bits(item), tops[item.key], counts)
        assert item.rows is not None
        return item.rows[0], counts

    # A key's blocks' own histograms are kept until its cuts are known (within the budget):
    # each block's ties are then its count in the cut's bin, with no pass 3 for that key.
    block_bytes = 2 * tasks * _BINS * 8
    holds = {key: len(split[key]) * block_bytes <= HELD_HISTOGRAM_BYTES for key in counted}
    positional = set()

    def finish(key: str, total: np.ndarray, held: list[tuple[int, np.ndarray]]) -> None:
        cut = cuts[key]
        cut.cut_bits, cut.above = breadcrumbs_kernels.cuts_in_bins(
            total, tops[key], higher[key], cut.start, cut.stop
        )
        at_cut = (cut.cut_bits & 0xFFFF).astype(np.int64)[..., None]
        ties = np.take_along_axis(total, at_cut, axis=2)[..., 0]
        if not _ranks_decide(cut.above, ties, cut.start, cut.stop):
            return
        if not holds[key]:
            positional.add(key)
            return
        running = np.zeros((2, tasks), dtype=np.int64)
        for index, (first_row, counts) in enumerate(held):
            if index:
                cut.ties_before[first_row] = running.copy()
            running += np.take_along_axis(counts, at_cut, axis=2)[..., 0]

    key, total, held = None, None, []
    for block_key, (first_row, counts) in stream.map(
        low, f"{name}: cuts 2/2", row_blocks=True, keys=counted
    ):
        if block_key != key:
            if key is not None:
                finish(key, total, held)
            key, total, held = block_key, counts.copy(), []
        else:
            total += counts
        if holds[key]:
            held.append((first_row, counts))
    if key is not None:
        finish(key, total, held)
    del held

    def tie_counts(item: TensorItem) -> tuple[int, np.ndarray]:
        counts = np.zeros((2, tasks), dtype=np.int64)
        taus = _bits(item).view(np.float32)
        breadcrumbs_kernels.tie_counts(taus, cuts[item.key].cut_bits, counts)
        assert item.rows is not None
        return item.rows[0], counts

    if positional:  # keys over the budget: their blocks' ties counted in one more pass
        running: dict[str, np.ndarray] = {}
        passes = stream.map(tie_counts, f"{name}: ties", row_blocks=True, keys=positional)
        for key, (first_row, counts) in passes:
            before = running.get(key)
            if before is not None:
                cuts[key].ties_before[first_row] = before
            running[key] = counts if before is None else before + counts
    return cuts


def _ranks_decide(above: np.ndarray, ties: np.ndarray, start: int, stop: int) -> bool:
    """Whether, for some cut and task, the ties at the cut (ranks `above .. above+ties-1`)
    are kept in part: then which ones depends on where they lie."""
    kept_from = np.maximum(above, start)
    kept_to = np.minimum(above + ties, stop)
    return bool(np.any((kept_from < kept_to) & ((kept_from > above) | (kept_to < above + ties))))
