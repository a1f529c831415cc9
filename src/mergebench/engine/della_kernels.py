"""Compiled CPU kernel (numba) for DELLA: rank, MagPrune, elect and disjoint mean of a slab.

`della_rows` does, row by row of a `[N, rows, n]` float32 stack, what `methods.della`'s
torch formulas did (docs/methods.md, DELLA), bit for bit:
- the rank of `|tau_i|` in its row, ascending and stable (ties in index order), comes from
  an LSD radix sort of the float32 bit patterns of `|tau|` (a stable sort: equal keys keep
  their index order, as `torch.argsort(stable=True)`; every NaN counts as one value above
  +inf, as torch's sort has it); the keep probability of rank `r` is `qtab[r]`, computed
  by the torch formula beforehand;
- `tau' = (tau * float(u < q)) / q` (`tau * float(u < q)` without `rescale`) in float32,
  `u` the caller's torch draws;
- elect and mean per entry in float32, tasks added in order, `mean * scaling` last.

The kernel runs serially and releases the GIL: the stream runs row blocks on its workers.
"""

from __future__ import annotations

import numpy as np
from numba import njit

import mergebench.engine.kernels  # noqa: F401  (picks numba's cache folder first)

_ABS = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)
_NAN = np.uint32(0x7FC00000)
# Radix digits of the 31-bit key: bits 0-10, 11-21, 22-30.
_SHIFTS = (0, 11, 22)
_BINS = 2048


@njit(cache=True, nogil=True)
def _rank_probabilities(
    bits: np.ndarray,
    qtab: np.ndarray,
    q: np.ndarray,
    keys: np.ndarray,
    keys2: np.ndarray,
    order: np.ndarray,
    order2: np.ndarray,
    hist: np.ndarray,
) -> None:
    """`q[i] = qtab[rank of |x_i|]` for one row given as float32 bit patterns `bits`."""
    n = bits.shape[0]
    hist[:] = 0
    for i in range(n):
        k = bits[i] & _ABS
        if k > _INF:
            k = _NAN
        keys[i] = k
        order[i] = i
        hist[0, k & 2047] += 1
        hist[1, (k >> 11) & 2047] += 1
        hist[2, k >> 22] += 1
    src_k, src_o, dst_k, dst_o = keys, order, keys2, order2
    for p in range(3):
        shift = _SHIFTS[p]
        counts = hist[p]
        if counts[(src_k[0] >> shift) & 2047] == n:
            continue  # one digit value in the whole row: the pass would not move anything
        total = 0
        for d in range(_BINS):
            c = counts[d]
            counts[d] = total
            total += c
        for i in range(n):
            k = src_k[i]
            d = (k >> shift) & 2047
            at = counts[d]
            counts[d] = at + 1
            dst_k[at] = k
            dst_o[at] = src_o[i]
        src_k, src_o, dst_k, dst_o = dst_k, dst_o, src_k, src_o
    for r in range(n):
        q[src_o[r]] = qtab[r]


@njit(cache=True, nogil=True, error_model="numpy")
def della_rows(
    taus: np.ndarray,
    bits: np.ndarray,
    draws: np.ndarray,
    qtab: np.ndarray,
    rescale: bool,
    scaling: np.float32,
    out: np.ndarray,
) -> None:
    """`out[r] = scaling * disjoint_mean(MagPrune(taus[:, r]))` for every row `r`.

    `taus`, `draws`: `[N, rows, n]` float32 (C-contiguous); `bits`: `taus` viewed as
    uint32; `qtab`: `[n]` float32 keep probability by 0-based rank; `out`: `[rows, n]`, which
    may be `draws[0]` (`Della.merge_item` saves a buffer so): row `r` of `out` is written
    only after every draw of row `r` has been read.
    """
    num_tasks, num_rows, n = taus.shape
    q = np.empty(n, np.float32)
    pruned = np.empty((num_tasks, n), np.float32)
    keys = np.empty(n, np.uint32)
    keys2 = np.empty(n, np.uint32)
    order = np.empty(n, np.int64)
    order2 = np.empty(n, np.int64)
    hist = np.empty((3, _BINS), np.int64)
    zero = np.float32(0.0)
    for r in range(num_rows):
        for t in range(num_tasks):
            if n == 1:
                q[0] = qtab[0]
            else:
                _rank_probabilities(bits[t, r], qtab, q, keys, keys2, order, order2, hist)
            row = taus[t, r]
            u = draws[t, r]
            for i in range(n):
                kept = row[i] * np.float32(u[i] < q[i])
                pruned[t, i] = kept / q[i] if rescale else kept
        for i in range(n):
            total = zero
            for t in range(num_tasks):
                total += pruned[t, i]
            gamma = np.float32(1.0) if total >= zero else np.float32(-1.0)
            agreeing = zero
            count = 0
            for t in range(num_tasks):
                p = pruned[t, i]
                agree = p * gamma > zero
                agreeing += p * np.float32(agree)
                count += agree
            mean = agreeing / np.float32(count) if count > 0 else zero
            out[r, i] = mean * scaling
