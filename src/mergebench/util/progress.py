"""Progress for long work: a tqdm bar on a terminal, plain lines elsewhere.

Logs (CI, SLURM, `make bench > log`) get one line when a stage finishes, never `\r` bars.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class LineProgress:
    """The part of tqdm's interface we use; prints `<desc>: <n> <unit>s in <s> s` once."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self._start = time.perf_counter()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            seconds = time.perf_counter() - self._start
            print(f"{self.desc}: {self.n} {self.unit}s in {seconds:.1f} s", file=sys.stderr,
                  flush=True)  # fmt: skip

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


class _Silent(LineProgress):
    def close(self) -> None:
        self._closed = True


def stage(total: int | None, desc: str, enabled: bool = True, unit: str = "tensor") -> Any:
    """A progress object for one stage: a bar on a terminal, one line at the end elsewhere,
    nothing when disabled."""
    if not enabled:
        return _Silent(total, desc, unit)
    if on_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False)
    return LineProgress(total, desc, unit)


def track(items: Iterable[T], desc: str, enabled: bool = True, unit: str = "it") -> Iterator[T]:
    """Iterate `items` with `stage` progress."""
    items = list(items)
    with stage(len(items), desc, enabled, unit) as bar:
        for item in items:
            yield item
            bar.update()
