"""Compiled CPU kernels (numba) for Breadcrumbs' `scope: tensor` (one flattened tensor per
task is one row; methods.md).

Per task the kept ranks `[start, stop)` of |tau| descending become two thresholds found by
the radix select (`mergebench.engine.topk`'s two-level histogram of the float32 bits): `a`,
the `(start+1)`-th largest |tau|, and `b`, the `stop`-th largest, each with the count of
entries strictly above it. An entry of |tau| `v` has rank `(entries > v) + (entries == v
before it)`, so `b < v < a` is kept and an entry equal to a cut is kept when that rank, the
equal entries counted in index order, lies in `[start, stop)`: a stable sort's rule.
Those ranks pick, per cut, one range of flat indices in which its equal entries are kept
(`tie_ranges`, one scan); `mask_sum` then keeps, sums in task order from +0 (as
`sum_tasks`) and scales in one branch-free pass.
A tensor the stream hands over in row blocks gets the same cuts from the same histograms
counted block by block (`cut_bins`, `cuts_in_bins`; `methods.breadcrumbs_blocks`), and each
block's tie ranges start from the ties in the blocks before it (`tie_counts`).

Nothing here allocates per entry: 65,536-bin histograms per task and cut, one `[block]`
accumulator. Kernels release the GIL (`nogil`); the stream runs keys on threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Importing `kernels` first sets numba's cache folder (a read-only install falls back).
from mergebench.engine import kernels

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


def rank_cuts(taus: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Per task row of `taus` (float32 `[N, numel]`, `0 <= start < stop <= numel`), the
    `(start+1)`-th and the `stop`-th largest |tau| as float32 bits (uint32 `[2, N]`) and the
    count of entries strictly above each (int64 `[2, N]`): two counting passes over `taus`
    for both cuts, the high 16 bits of |tau| first, then the low 16 in each cut's bin."""
    bits = taus.view(np.uint32)
    high = np.zeros((bits.shape[0], 1 << 16), dtype=np.int64)
    kernels.high_counts(bits, high)
    tops, higher = cut_bins(high, start, stop)
    low = np.zeros((2, bits.shape[0], 1 << 16), dtype=np.int64)
    low_counts_two(bits, tops, low)
    return cuts_in_bins(low, tops, higher, start, stop)


def cut_bins(high: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """From the high-bits histograms `[N, bins]` of |tau|: per cut c (0: the `(start+1)`-th
    largest, 1: the `stop`-th) and task t, the bin holding it and the count in higher bins
    (int64 `[2, N]` each)."""
    tasks = high.shape[0]
    tops = np.empty((2, tasks), dtype=np.int64)
    higher = np.empty((2, tasks), dtype=np.int64)
    for c, k in enumerate((start + 1, stop)):
        for t in range(tasks):
            tops[c, t], higher[c, t] = bin_with_kth_largest(high[t], k)
    return tops, higher


def cuts_in_bins(
    low: np.ndarray, tops: np.ndarray, higher: np.ndarray, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """The cuts (float32 bits, uint32 `[2, N]`) and the counts strictly above them (int64
    `[2, N]`) from `low_counts_two`'s histograms `[2, N, bins]` in the bins of `cut_bins`."""
    tasks = tops.shape[1]
    cut_bits = np.empty((2, tasks), dtype=np.uint32)
    above = np.empty((2, tasks), dtype=np.int64)
    for c, k in enumerate((start + 1, stop)):
        for t in range(tasks):
            bottom, higher_low = bin_with_kth_largest(low[c, t], k - int(higher[c, t]))
            cut_bits[c, t] = (int(tops[c, t]) << 16) | bottom
            above[c, t] = higher[c, t] + higher_low
    return cut_bits, above


@njit(cache=True, nogil=True)
def low_counts_two(bits: np.ndarray, tops: np.ndarray, counts: np.ndarray) -> None:
    """Radix select pass 2 for two cuts per row: `counts[c, r, b] +=` the entries of row r in
    the high-bits bin `tops[c, r]` whose low 16 bits are b (c = 0, 1)."""
    rows, numel = bits.shape
    for r in range(rows):
        top0, top1 = tops[0, r], tops[1, r]
        for i in range(numel):
            value = bits[r, i]
            high = (value >> 16) & 0x7FFF
            if high == top0:
                counts[0, r, value & 0xFFFF] += 1
            if high == top1:
                counts[1, r, value & 0xFFFF] += 1


def bin_with_kth_largest(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin of `hist` holding the k-th largest entry, and how many lie in higher bins."""
    above = np.cumsum(hist[::-1])[::-1]  # entries in bins >= b
    index = int(np.flatnonzero(above >= k)[-1])
    higher = int(above[index + 1]) if index + 1 < hist.shape[0] else 0
    return index, higher


@njit(cache=True, nogil=True)
def tie_ranges(
    taus: np.ndarray, cut_bits: np.ndarray, above: np.ndarray, start: int, stop: int
) -> np.ndarray:
    """Per cut c and task t, the flat index range `[lo, hi)` (int64 `[2, 2, N]`: lo, hi)
    in which entries equal to the cut are kept. The q-th such entry (0-based, index order)
    has rank `above[c, t] + q`, kept iff in `[start, stop)`: `lo` is the index of the one
    with `q = start - above`, `hi` of the one with `q = stop - above` (q below 0 read as 0;
    the tensor's size where there is no such entry)."""
    n, numel = taus.shape
    ranges = np.full((2, 2, n), numel, dtype=np.int64)
    cuts = cut_bits.view(np.float32)
    for t in range(n):
        a, b = cuts[0, t], cuts[1, t]
        wanted = np.empty((2, 2), dtype=np.int64)  # [bound, cut] -> tie ordinal
        for c in range(2):
            wanted[0, c] = max(0, start - above[c, t])
            wanted[1, c] = max(0, stop - above[c, t])
        count_a = 0
        count_b = 0
        for i in range(numel):
            v = abs(taus[t, i])
            if (v == a) | (v == b):  # rare: a branch predicted not taken
                if v == a:
                    for bound in range(2):
                        if count_a == wanted[bound, 0]:
                            ranges[bound, 0, t] = i
                    count_a += 1
                if v == b:
                    for bound in range(2):
                        if count_b == wanted[bound, 1]:
                            ranges[bound, 1, t] = i
                    count_b += 1
    return ranges


@njit(cache=True, nogil=True)
def tie_counts(taus: np.ndarray, cut_bits: np.ndarray, counts: np.ndarray) -> None:
    """`counts[c, t] +=` the entries of task row t whose |tau| equals cut c (`cut_bits`,
    float32 bits `[2, N]`): the ties a later block of the same tensor has before it."""
    n, numel = taus.shape
    cuts = cut_bits.view(np.float32)
    for t in range(n):
        a, b = cuts[0, t], cuts[1, t]
        count_a = 0
        count_b = 0
        for i in range(numel):
            v = abs(taus[t, i])
            count_a += v == a
            count_b += v == b
        counts[0, t] += count_a
        counts[1, t] += count_b


@njit(cache=True, nogil=True)
def mask_sum(
    taus: np.ndarray,
    cut_bits: np.ndarray,
    ranges: np.ndarray,
    scaling: np.float32,
    block: int,
    out: np.ndarray,
) -> None:
    """`out = scaling * sum_t (tau_t * keep_t)` over `[N, numel]` float32 task rows, summed
    in task order from +0; `keep_t`: `b < |tau| < a` for task t's cuts `cut_bits[c, t]`
    (float32 bits, c = 0: upper `a`, c = 1: lower `b`), or `|tau|` equal to cut c at a flat
    index in its `tie_ranges` `[ranges[0, c, t], ranges[1, c, t])`. Branch-free: vectorizes."""
    n, numel = taus.shape
    cuts = cut_bits.view(np.float32)
    acc = np.empty(block, dtype=np.float32)
    for first in range(0, numel, block):
        width = min(block, numel - first)
        for t in range(n):
            a, b = cuts[0, t], cuts[1, t]
            lo_a, hi_a, lo_b, hi_b = (
                ranges[0, 0, t],
                ranges[1, 0, t],
                ranges[0, 1, t],
                ranges[1, 1, t],
            )
            for j in range(width):
                i = first + j
                x = taus[t, i]
                v = abs(x)
                keep = (
                    ((v < a) & (v > b))
                    | ((v == a) & (i >= lo_a) & (i < hi_a))
                    | ((v == b) & (i >= lo_b) & (i < hi_b))
                )
                acc[j] = (_F0 if t == 0 else acc[j]) + x * (_F1 if keep else _F0)
        for j in range(width):
            out[first + j] = acc[j] * scaling
