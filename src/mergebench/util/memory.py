"""Resident memory of a block of work: its own peak above where it started, and the process's.

The kernel's own peaks (VmHWM in /proc/self/status, `ru_maxrss`) are process-lifetime maxima:
in a multirun or beside loaded data and models they report what was resident before the block
(an evaluation's models, another job's merge), the same for every row. Resetting VmHWM
(`/proc/self/clear_refs`) would erase the process figure kept beside ours and the peak other
readers of `ru_maxrss` see. tracemalloc sees Python's allocations only, not torch's. So a
thread samples the resident size (/proc/self/statm) every few milliseconds while the block
runs; a spike shorter than the interval may be missed, which for merges that hold tensors
for milliseconds or more is small.
"""

from __future__ import annotations

import os
import threading


def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """The process's resident size now (Linux); elsewhere its lifetime peak, the best known."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except OSError:
        return high_water_bytes()


def high_water_bytes() -> int:
    """The process's resident high-water mark since it started (VmHWM, `ru_maxrss`)."""
    import resource  # POSIX only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Resident memory while the block runs, sampled every `interval` seconds:

    - `start`: the process's resident size as the block began;
    - `peak`: the largest resident size seen during the block (the whole process's);
    - `own`: `peak - start`, what the block itself added at its peak;
    - `high_water`: the process's lifetime high-water mark when the block ended.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = self.high_water = 0
        self._stop = threading.Event()

    @property
    def own(self) -> int:
        return max(0, self.peak - self.start)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = resident_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())
        self.high_water = max(high_water_bytes(), self.peak)
