"""Compiled CPU kernels (numba) for the hot data-free methods: one pass over the task rows.

Each kernel reads the `[N, numel]` float32 task vectors of a key (or row block) and writes
its outputs without `[N, ...]` temporaries, bit for bit what the numpy formulas they replace
computed:
- float32 sums over the task axis are added in task order from +0, `((0 + x_0) + x_1) + ...`
  (what numpy's reduction over the first axis of a C-contiguous array does: all -0.0
  entries sum to +0.0);
- float64 sums along a row repeat numpy's casting reduction exactly: the row cut into
  blocks (the old kernels' block size, `sum_block`), each summed as numpy does, i.e.
  `0 + pairwise(chunk_0) + pairwise(chunk_1) + ...` over chunks of its 8,192-entry cast
  buffer, with numpy's pairwise summation (`_pairwise`) inside each chunk.

The kernels run serially and release the GIL (`nogil`): the stream already runs keys (and
row blocks) on one worker thread per core, and numba's default threading layer refuses
parallel kernels launched from several threads at once. `cache=True` keeps compiled code
between processes: next to this file, or (a read-only install) in numba's per-user cache
directory, `$NUMBA_CACHE_DIR` if set.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# numpy's default buffer size: a casting reduction sums chunks of this many entries.
_CAST_CHUNK = 8192
# Entries per inner block of the float32 kernels (work arrays stay in L1/L2).
_BLOCK = 1024
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_FM1 = np.float32(-1.0)

# What `_pairwise` sums, per entry i: |a[i]|, or |u[i]| where sgn(a[i]) * sgn(u[i]) > 0 else 0.
_ABS = 0
_MASKED_UNIFIED = 1


@njit(cache=True, nogil=True, inline="always")
def _term(kind: int, a: np.ndarray, u: np.ndarray, i: int) -> float:
    if kind == _ABS:
        return np.float64(abs(a[i]))
    x, y = a[i], u[i]
    if (x > 0 and y > 0) or (x < 0 and y < 0):
        return np.float64(abs(y))
    return 0.0


@njit(cache=True, nogil=True)
def _pairwise(kind: int, a: np.ndarray, u: np.ndarray, start: int, n: int) -> float:
    """numpy's `pairwise_sum` (loops_utils.h) of the float64 terms `start .. start + n`."""
    if n < 8:
        res = 0.0
        for i in range(start, start + n):
            res += _term(kind, a, u, i)
        return res
    if n <= 128:
        r0 = _term(kind, a, u, start)
        r1 = _term(kind, a, u, start + 1)
        r2 = _term(kind, a, u, start + 2)
        r3 = _term(kind, a, u, start + 3)
        r4 = _term(kind, a, u, start + 4)
        r5 = _term(kind, a, u, start + 5)
        r6 = _term(kind, a, u, start + 6)
        r7 = _term(kind, a, u, start + 7)
        whole = n - n % 8
        for i in range(start + 8, start + whole, 8):
            r0 += _term(kind, a, u, i)
            r1 += _term(kind, a, u, i + 1)
            r2 += _term(kind, a, u, i + 2)
            r3 += _term(kind, a, u, i + 3)
            r4 += _term(kind, a, u, i + 4)
            r5 += _term(kind, a, u, i + 5)
            r6 += _term(kind, a, u, i + 6)
            r7 += _term(kind, a, u, i + 7)
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        for i in range(start + whole, start + n):
            res += _term(kind, a, u, i)
        return res
    half = n // 2
    half -= half % 8
    return _pairwise(kind, a, u, start, half) + _pairwise(kind, a, u, start + half, n - half)


@njit(cache=True, nogil=True)
def _row_sum(kind: int, a: np.ndarray, u: np.ndarray, start: int, stop: int) -> float:
    """`np.add.reduce(terms[start:stop], dtype=np.float64)` bit for bit (one cast buffer at a
    time, each summed pairwise, added from 0)."""
    total = 0.0
    for chunk in range(start, stop, _CAST_CHUNK):
        total += _pairwise(kind, a, u, chunk, min(_CAST_CHUNK, stop - chunk))
    return total


@njit(cache=True, nogil=True)
def scaled_task_sum(taus: np.ndarray, scaling: np.float32, out: np.ndarray) -> None:
    """Task arithmetic: `out = scaling * sum_t taus[t]` (float32, task order)."""
    n, numel = taus.shape
    for j in range(numel):
        acc = _F0
        for t in range(n):
            acc += taus[t, j]
        out[j] = acc * scaling


@njit(cache=True, nogil=True)
def ties_merge(
    taus: np.ndarray,
    thresholds: np.ndarray,
    mean: bool,
    scaling: np.float32,
    block: int,
    out: np.ndarray,
) -> None:
    """TIES on `[N, numel]`: trim (`|tau| >= threshold` of its task, else `tau * 0`), elect
    `gamma = +1` where the trimmed task sum is > 0 else -1, disjoint sum (or mean) of the
    trimmed entries with `trimmed * gamma > 0`, times `scaling` (all float32)."""
    n, numel = taus.shape
    total = np.empty(block, dtype=np.float32)
    gamma = np.empty(block, dtype=np.float32)
    count = np.empty(block, dtype=np.int64)
    for start in range(0, numel, block):
        width = min(block, numel - start)
        for t in range(n):
            limit = thresholds[t]
            for j in range(width):
                x = taus[t, start + j]
                trimmed = x * (_F1 if abs(x) >= limit else _F0)
                total[j] = (_F0 if t == 0 else total[j]) + trimmed
        for j in range(width):
            gamma[j] = _F1 if total[j] > 0 else _FM1
        for t in range(n):
            limit = thresholds[t]
            for j in range(width):
                x = taus[t, start + j]
                trimmed = x * (_F1 if abs(x) >= limit else _F0)
                agree = trimmed * gamma[j] > 0
                kept = trimmed * (_F1 if agree else _F0)
                if t == 0:
                    total[j], count[j] = _F0, 0
                total[j] += kept
                count[j] += 1 if agree else 0
        for j in range(width):
            value = total[j]
            if mean:
                value = value / np.float32(max(count[j], 1)) if count[j] > 0 else _F0
            out[start + j] = value * scaling


@njit(cache=True, nogil=True)
def _elect_block(
    taus: np.ndarray, start: int, width: int, work: np.ndarray, out: np.ndarray
) -> None:
    """EMR's election (`magnitude=max`) of entries `start .. start + width` into `out`:
    `max_t tau_t` where the task sum is > 0, else `min_t tau_t` if < 0, else -0.0."""
    n = taus.shape[0]
    total, high, low = work[0], work[1], work[2]
    for j in range(width):
        x = taus[0, start + j]
        total[j], high[j], low[j] = x, x, x
    for t in range(1, n):
        for j in range(width):
            x = taus[t, start + j]
            total[j] += x
            high[j] = max(high[j], x)
            low[j] = min(low[j], x)
    for j in range(width):
        # low = -0.0 gives -0.0 either way: the sign of a zero max/min never shows.
        chosen = low[j] if low[j] < 0 else np.float32(-0.0)
        out[start + j] = high[j] if total[j] > 0 else chosen


@njit(cache=True, nogil=True)
def _elect_sum_block(
    taus: np.ndarray, start: int, width: int, work: np.ndarray, out: np.ndarray
) -> None:
    """The BEiT-3 election (`magnitude=sum`): `flag = +1` where the task sum is > 0 else -1,
    `eps = sum_t max(tau_t * flag, 0)` from +0 in task order, `out = eps * flag`."""
    n = taus.shape[0]
    total = work[0]
    for j in range(width):
        total[j] = taus[0, start + j]
    for t in range(1, n):
        for j in range(width):
            total[j] += taus[t, start + j]
    for j in range(width):
        flag = _F1 if total[j] > 0 else _FM1
        eps = _F0
        for t in range(n):
            agreeing = taus[t, start + j] * flag
            eps += agreeing if agreeing > 0 else _F0
        out[start + j] = eps * flag


# `modulate`'s election: none (`unified` is given), EMR's max, or the BEiT-3 sum.
ELECT_NONE = 0
ELECT_MAX = 1
ELECT_SUM = 2


@njit(cache=True, nogil=True)
def modulate(
    taus: np.ndarray,
    unified: np.ndarray,
    elect: int,
    mask: bool,
    rescale: bool,
    sum_block: int,
    packed: np.ndarray,
    numerator: np.ndarray,
    denominator: np.ndarray,
) -> None:
    """Mask & Rescale of one key (or row block) `[N, numel]` against `unified` `[numel]`
    (written first by the election `elect`, if any): `packed[t]` gets the bits of
    `sgn(tau_t) * sgn(tau_uni) > 0` (little bit order, 8 entries a byte), and, if `rescale`,
    `numerator[t] += sum|tau_t|`, `denominator[t] += sum|M_t * tau_uni|` (or `sum|tau_uni|`
    without masks) in float64, added block by block as the numpy kernel did (`sum_block`
    entries each, a multiple of 8)."""
    n, numel = taus.shape
    work = np.empty((3, _BLOCK), dtype=np.float32)
    for block in range(0, numel, sum_block):
        stop = min(numel, block + sum_block)
        if elect != ELECT_NONE:
            for start in range(block, stop, _BLOCK):
                width = min(_BLOCK, stop - start)
                if elect == ELECT_MAX:
                    _elect_block(taus, start, width, work, unified)
                else:
                    _elect_sum_block(taus, start, width, work, unified)
        if mask:
            for t in range(n):
                for first in range(block, stop, 8):
                    byte = 0
                    for bit in range(min(8, stop - first)):
                        x, y = taus[t, first + bit], unified[first + bit]
                        same = ((x > 0) & (y > 0)) | ((x < 0) & (y < 0))
                        byte |= np.int64(same) << bit
                    packed[t, first // 8] = byte
        if rescale:
            for t in range(n):
                numerator[t] += _row_sum(_ABS, taus[t], unified, block, stop)
                if mask:
                    denominator[t] += _row_sum(_MASKED_UNIFIED, taus[t], unified, block, stop)
            if not mask:
                plain = _row_sum(_ABS, unified, unified, block, stop)
                for t in range(n):
                    denominator[t] += plain


@njit(cache=True, nogil=True)
def drop_and_rescale(
    row: np.ndarray, words: np.ndarray, threshold: np.int64, rescale: bool, keep: np.float32
) -> None:
    """DARE on one task row, in place: `row[i] *= (words[i] >= threshold)`, then divided by
    `keep = 1 - p` (float32) if `rescale`."""
    for i in range(row.shape[0]):
        x = row[i] * (_F1 if np.int64(words[i]) >= threshold else _F0)
        row[i] = x / keep if rescale else x


@njit(cache=True, nogil=True)
def high_counts(bits: np.ndarray, counts: np.ndarray) -> None:
    """Radix select pass 1: `counts[r, b] +=` the entries of row r (float32 bits as uint32)
    whose |value|'s high 16 bits are b."""
    rows, numel = bits.shape
    for r in range(rows):
        for i in range(numel):
            counts[r, (bits[r, i] >> 16) & 0x7FFF] += 1


@njit(cache=True, nogil=True)
def low_counts(bits: np.ndarray, tops: np.ndarray, counts: np.ndarray) -> None:
    """Radix select pass 2: `counts[r, b] +=` the entries of row r in the high-bits bin
    `tops[r]` whose low 16 bits are b."""
    rows, numel = bits.shape
    for r in range(rows):
        top = tops[r]
        for i in range(numel):
            value = bits[r, i]
            if ((value >> 16) & 0x7FFF) == top:
                counts[r, value & 0xFFFF] += 1
