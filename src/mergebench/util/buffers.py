"""Reused buffers that system calls copy into or out of, in transparent huge pages.

Copying out of the page cache costs the kernel several times more into 4 KiB pages than
into 2 MiB ones on the machines we measured (a 2-core virtual machine: 3 GB read into a
4 KiB-page buffer took 1.24 s of system time, into a huge-page one 0.30 s; docs/performance.md).
numpy asks for huge pages itself only from 4 MiB up, torch not at all, so the merge's reused
read buffers, and the hash's, come from here: anonymous memory of their own, rounded up to
whole 2 MiB pages, with `MADV_HUGEPAGE` where the platform has it (elsewhere plain memory).
"""

from __future__ import annotations

import contextlib
import math
import mmap

import numpy as np

HUGE_PAGE = 2 << 20


def huge_page_array(shape: int | tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A zeroed, writable C-contiguous array of `shape` in memory that asks for huge pages."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = math.prod(shape)
    nbytes = max(HUGE_PAGE, -(-count * dtype.itemsize // HUGE_PAGE) * HUGE_PAGE)
    region = mmap.mmap(-1, nbytes)  # anonymous, zero-filled; the array keeps it alive
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # huge pages off or unknown here: plain pages
            region.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(region, dtype=dtype, count=count).reshape(shape)
