"""Exact k-th largest |value| over many tensors, streamed: a two-level radix select.

The bit pattern of a non-negative float32, read as an int32, orders exactly like the float.
Pass 1 histograms the high 16 bits of every |x| (per task); the bin holding the k-th largest
is found from the counts. Pass 2 histograms the low 16 bits of the entries in that bin, which
pins the exact value. Memory: two 65,536-bin histograms per task, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

_BINS = 1 << 16


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    return x.abs().to(torch.float32).contiguous().view(torch.int32).reshape(-1).to(torch.int64)


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
    high = torch.zeros(num_rows, _BINS, dtype=torch.int64)
    for chunk in passes():
        bits = _abs_bits_rows(chunk, num_rows)
        for r in range(num_rows):
            high[r] += torch.bincount(bits[r] >> 16, minlength=_BINS)
    targets = [_bin_with_kth_largest(high[r], k[r]) for r in range(num_rows)]

    low = torch.zeros(num_rows, _BINS, dtype=torch.int64)
    for chunk in passes():
        bits = _abs_bits_rows(chunk, num_rows)
        for r, (top, _) in enumerate(targets):
            selected = bits[r][(bits[r] >> 16) == top]
            low[r] += torch.bincount(selected & 0xFFFF, minlength=_BINS)
    values = []
    for r, (top, higher) in enumerate(targets):
        bottom, _ = _bin_with_kth_largest(low[r], k[r] - higher)
        values.append((top << 16) | bottom)
    return torch.tensor(values, dtype=torch.int32).view(torch.float32)


def _abs_bits_rows(chunk: torch.Tensor, num_rows: int) -> torch.Tensor:
    return _abs_bits(chunk.cpu()).reshape(num_rows, -1)


def kth_largest_abs_in_tensor(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |value| of one tensor (in memory)."""
    return torch.topk(x.abs().reshape(-1), k, sorted=False).values.min()
