"""Exact k-th largest |value| over many tensors, streamed: a two-level radix select.

The bit pattern of a non-negative float32, read as an int32, orders exactly like the float.
Pass 1 histograms the high 16 bits of every |x| (per task); the bin holding the k-th largest
is found from the counts. Pass 2 histograms the low 16 bits of the entries in that bin, which
pins the exact value. Memory: two 65,536-bin histograms per task, whatever the model size.

`RadixSelect` splits the work so that chunks can be counted in any order and in parallel
(counts are added up, which is exact; the counting is compiled, `kernels.high_counts` and
`low_counts`); `kth_largest_abs` drives it over a callable that
replays the chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from mergebench.engine import kernels

_BINS = 1 << 16


def _bits(chunk: torch.Tensor, rows: int) -> np.ndarray:
    """The float32 bits of a chunk as uint32 `[rows, numel]` (a view when it can be)."""
    flat = chunk.detach().to("cpu", torch.float32).contiguous().reshape(rows, -1).numpy()
    return flat.view(np.uint32)


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
        counts = np.zeros((self.rows, _BINS), dtype=np.int64)
        # The sign bit is the top bit of the high half: masked off, -x counts as |x|.
        kernels.high_counts(_bits(chunk, self.rows), counts)
        return torch.from_numpy(counts)

    def add_high(self, counts: torch.Tensor) -> None:
        self.high += counts

    # -- pass 2 -------------------------------------------------------------------------------
    def targets(self) -> list[tuple[int, int]]:
        """Per row: the high-bits bin holding the k-th largest, and the count above it."""
        if self._targets is None:
            self._targets = [
                bin_with_kth_largest(self.high[r], self.k[r]) for r in range(self.rows)
            ]
        return self._targets

    def low_counts(self, chunk: torch.Tensor) -> torch.Tensor:
        """Histogram of the low 16 bits of the entries in each row's target bin."""
        counts = np.zeros((self.rows, _BINS), dtype=np.int64)
        tops = np.array([top for top, _ in self.targets()], dtype=np.int64)
        kernels.low_counts(_bits(chunk, self.rows), tops, counts)
        return torch.from_numpy(counts)

    def add_low(self, counts: torch.Tensor) -> None:
        self.low += counts

    def values(self) -> torch.Tensor:
        """The exact k-th largest |value| per row (float32 `[rows]`)."""
        return kth_values(self.low, self.targets(), self.k)


def kth_values(low: torch.Tensor, targets: list[tuple[int, int]], k: list[int]) -> torch.Tensor:
    """`RadixSelect.values` from pass 2's histograms `low` `[rows, bins]` and pass 1's
    `targets`: for counts added up elsewhere (one key's row blocks, say)."""
    values = []
    for r, (top, higher) in enumerate(targets):
        bottom, _ = bin_with_kth_largest(low[r], k[r] - higher)
        values.append((top << 16) | bottom)
    return torch.tensor(values, dtype=torch.int32).view(torch.float32)


def per_key_totals(results: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Add up the counts `TaskVectorStream.map` yields for the row blocks of each key (they
    come in key order): one key's total at a time, so memory does not grow with the keys."""
    key, total = None, None
    for block_key, counts in results:
        if block_key != key:
            if key is not None:
                yield key, total
            key, total = block_key, counts
        else:
            total += counts
    if key is not None:
        yield key, total


def bin_with_kth_largest(hist: torch.Tensor, k: int) -> tuple[int, int]:
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
