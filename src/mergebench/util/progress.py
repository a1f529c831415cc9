"""Progress for long work: a tqdm bar on a terminal, plain lines elsewhere.

Logs (CI, SLURM, `make bench > log`) get plain lines, never `\r` bars: one when a stage
finishes, or one every `every` steps where a step is long (a validation candidate, a task's
statistics, AdaMerging steps). Lines go to the `mergebench` logger when logging is set up
(Hydra's job logging: the console and `outputs/runs/*/<job>.log`), else to stderr. While a
bar is shown, the lines still reach the log files (`to_log_files`), not the console.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

LOG = logging.getLogger("mergebench")


def on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _logging_on() -> bool:
    """Whether an INFO line of `LOG` reaches a handler (Hydra configures the root logger)."""
    return LOG.isEnabledFor(logging.INFO) and LOG.hasHandlers()


def say(line: str) -> None:
    """A progress or status line: to the logging handlers when logging is set up, else stderr."""
    if _logging_on():
        _dispatch(line, files_only=False)
    else:
        print(line, file=sys.stderr, flush=True)


def to_log_files(line: str) -> None:
    """`line` to the log files only (a bar, or a printed line, stands for it on the console)."""
    if _logging_on():
        _dispatch(line, files_only=True)


def _dispatch(line: str, files_only: bool) -> None:
    """The handlers `LOG.info(line)` would reach (less the console's with `files_only`). A log
    file that cannot be opened (its run folder removed: an earlier in-process Hydra run's
    handler) is skipped: a progress line must never fail the work it reports on."""
    record = LOG.makeRecord(LOG.name, logging.INFO, __file__, 0, line, None, None)
    logger: logging.Logger | None = LOG
    while logger is not None:
        for handler in logger.handlers:
            is_file = isinstance(handler, logging.FileHandler)
            if (is_file or not files_only) and record.levelno >= handler.level:
                with contextlib.suppress(OSError):
                    handler.handle(record)
        logger = logger.parent if logger.propagate else None


class LineProgress:
    """The part of tqdm's interface we use, as plain lines: `<desc>: <n> <unit>s in <s> s`
    at the end, and with `every`, `<desc>: <n>/<total> <unit>s, <s> s[, <note>]` every
    `every` steps. `out`: where lines go (`say`; `to_log_files` beside a bar)."""

    def __init__(
        self, total: int | None, desc: str, unit: str, every: int | None = None, out: Any = say
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.every, self.out, self.note = every, out, ""
        self._start = time.perf_counter()
        self._closed = False
        self._said = -1  # the count of the last line

    def set_postfix_str(self, note: str, refresh: bool = True) -> None:
        self.note = note

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.every and self.n // self.every > before // self.every:
            self._line()

    def _line(self) -> None:
        seconds = time.perf_counter() - self._start
        of = f"/{self.total}" if self.total is not None else ""
        note = f", {self.note}" if self.note else ""
        self.out(f"{self.desc}: {self.n}{of} {self.unit}s, {seconds:.1f} s{note}")
        self._said = self.n

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.every:
                if self._said != self.n:
                    self._line()
                return
            seconds = time.perf_counter() - self._start
            self.out(f"{self.desc}: {self.n} {self.unit}s in {seconds:.1f} s")

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


class _Silent(LineProgress):
    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self._closed = True


class _Bar:
    """A tqdm bar on the terminal, and the same stage's lines in the log files."""

    def __init__(self, total: int | None, desc: str, unit: str, every: int | None) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
        self.lines = LineProgress(total, desc, unit, every, out=to_log_files)

    def set_postfix_str(self, note: str, refresh: bool = True) -> None:
        self.bar.set_postfix_str(note, refresh=refresh)
        self.lines.set_postfix_str(note)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.lines.update(n)

    def close(self) -> None:
        self.bar.close()
        self.lines.close()

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.bar.close()


def stage(
    total: int | None,
    desc: str,
    enabled: bool = True,
    unit: str = "tensor",
    every: int | None = None,
) -> Any:
    """A progress object for one stage: a bar on a terminal, lines elsewhere (one at the end,
    or one every `every` updates), nothing when disabled. `set_postfix_str(note)` adds a
    note to the next line (a candidate's score)."""
    if not enabled:
        return _Silent(total, desc, unit)
    if on_terminal():
        return _Bar(total, desc, unit, every)
    return LineProgress(total, desc, unit, every)


def track(
    items: Iterable[T], desc: str, enabled: bool = True, unit: str = "it", every: int | None = None
) -> Iterator[T]:
    """Iterate `items` with `stage` progress; with `every`, a line names the item just done."""
    items = list(items)
    with stage(len(items), desc, enabled, unit, every) as bar:
        for item in items:
            yield item
            if every:
                bar.set_postfix_str(f"{item} done")
            bar.update()
