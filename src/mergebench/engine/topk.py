"""Exact k-th largest |value| over many tensors, streamed: a two-level radix select.

The bit pattern of a non-negative float32, read as an int32, orders exactly like the float.
Pass 1 histograms the high 16 bits of every |x| (per task); the bin holding the k-th largest
is found from the counts. Pass 2 histograms the low 16 bits of the entries in that bin, which
pins the exact value. Memory: two 65,536-bin histograms per task, whatever the model size.

`RadixSelect` splits the work so that chunks can be counted in any order and in parallel
(counts are added up, which is exact); `kth_largest_abs` drives it over a callable that
replays the chunks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch

_BINS = 1 << 16


def _halves(chunk: torch.Tensor, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, the high and low 16-bit halves of each float32 (views, no copy)."""
    flat = chunk.detach().to("cpu", torch.float32).contiguous().reshape(rows, -1).numpy()
    if sys.byteorder == "little":
        halves = flat.view(np.uint16)
        return [(row[1::2], row[0::2]) for row in halves]
    bits = flat.view(np.uint32)
    return [((row >> 16).astype(np.uint16), (row & 0xFFFF).astype(np.uint16)) for row in bits]


class RadixSelect:
    """Exact `k[r]`-th largest |value| per row r over chunks `[rows, ...]`, in two passes."""

    def __init__(self, k: list[int]) -> None:
        self.k = list(k)
        self.rows = len(self.k)
        self.high = torch.zeros(self.rows, _BINS, dtype=torch.int64)
        self.low = torch.zeros(self.rows, _BINS, dtype=torch.int64)
        self._targets: list[tuple[int, int]] | None = None

    # -- pass 1 -------------------------------------------------------------------------------
    def high_counts(self, chunk: torch.Tensor) -> torch.Tensor:
        """Histogram of the high 16 bits of |chunk| per row (pure: safe from any thread)."""
        counts = torch.zeros(self.rows, _BINS, dtype=torch.int64)
        for r, (high, _) in enumerate(_halves(chunk, self.rows)):
            # The sign bit is the top bit of the high half: fold -x onto |x|, no abs pass.
            folded = torch.bincount(torch.from_numpy(high.astype(np.int32)), minlength=_BINS)
            counts[r, : _BINS // 2] = folded[: _BINS // 2] + folded[_BINS // 2 :]
        return counts

    def add_high(self, counts: torch.Tensor) -> None:
        self.high += counts

    # -- pass 2 -------------------------------------------------------------------------------
    def targets(self) -> list[tuple[int, int]]:
        """Per row: the high-bits bin holding the k-th largest, and the count above it."""
        if self._targets is None:
            self._targets = [
                _bin_with_kth_largest(self.high[r], self.k[r]) for r in range(self.rows)
            ]
        return self._targets

    def low_counts(self, chunk: torch.Tensor) -> torch.Tensor:
        """Histogram of the low 16 bits of the entries in each row's target bin."""
        counts = torch.empty(self.rows, _BINS, dtype=torch.int64)
        for r, ((high, low), (top, _)) in enumerate(
            zip(_halves(chunk, self.rows), self.targets(), strict=True)
        ):
            selected = low[np.bitwise_and(high, 0x7FFF) == top]
            counts[r] = torch.from_numpy(np.bincount(selected, minlength=_BINS))
        return counts

    def add_low(self, counts: torch.Tensor) -> None:
        self.low += counts

    def values(self) -> torch.Tensor:
        """The exact k-th largest |value| per row (float32 `[rows]`)."""
        values = []
        for r, (top, higher) in enumerate(self.targets()):
            bottom, _ = _bin_with_kth_largest(self.low[r], self.k[r] - higher)
            values.append((top << 16) | bottom)
        return torch.tensor(values, dtype=torch.int32).view(torch.float32)


def _bin_with_kth_largest(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest, and how many entries lie in higher bins."""
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # count in bins >= b
    index = int(torch.nonzero(above >= k).max())
    higher = int(above[index + 1]) if index + 1 < _BINS else 0
    return index, higher


def kth_largest_abs(
    passes: Callable[[], Iterable[torch.Tensor]], num_rows: int, k: list[int]
) -> torch.Tensor:
    """Per row r, the exact `k[r]`-th largest |value| over all chunks `[num_rows, ...]`.

    `passes()` must yield the same chunks each time it is called (it is called twice).
    """
    if len(k) != num_rows:
        raise ValueError(f"k has {len(k)} entries for {num_rows} rows")
    select = RadixSelect(k)
    for chunk in passes():
        select.add_high(select.high_counts(chunk))
    for chunk in passes():
        select.add_low(select.low_counts(chunk))
    return select.values()


def kth_largest_abs_in_tensor(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |value| of one tensor (in memory)."""
    return torch.topk(x.abs().reshape(-1), k, sorted=False).values.min()
