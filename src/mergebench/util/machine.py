"""What the machine is doing when a run starts, and the advice it calls for.

On a busy machine torch's default (one thread per core) runs several times slower than one
thread: the cores are shared, and its threads wait on each other (vision evaluation 60
examples/s with 2 threads against 174 with 1, at load 5 on 2 cores). The thread count is
not changed behind the user's back (it may change the last bits of sums, hence a score):
the run says so once on the terminal (`mergebench`, `mergebench-zoo`), with the figure, and
the user picks."""

from __future__ import annotations

import os

# A machine is busy when its 1-minute load reaches this share of its cores.
BUSY_LOAD_PER_CORE = 1.0


def busy_machine_advice(threads: int | None) -> str | None:
    """One line advising `threads=1` when torch is left at its default (`threads` null) on a
    machine whose load is at least its core count; None otherwise."""
    if threads is not None or not hasattr(os, "getloadavg"):
        return None
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if cores < 2 or load < BUSY_LOAD_PER_CORE * cores:
        return None
    return (
        f"note: the machine is busy (load {load:.1f} on {cores} cores) and threads=null uses "
        f"all {cores}: threads=1 is often several times faster here (vision evaluation 174 vs "
        "60 examples/s measured at load 5 on 2 cores); set threads= to choose"
    )
