"""A log file whose folder is gone (an earlier in-process Hydra run's handler, its run folder
removed) never fails the work a progress line reports on; the other handlers still get it."""

from __future__ import annotations

import logging

from mergebench.util.progress import LOG, say, to_log_files


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_log_file_that_cannot_open_is_skipped(tmp_path):
    stale = logging.FileHandler(tmp_path / "gone" / "bench.log", delay=True)  # never created
    seen = Collect()
    level = LOG.level
    LOG.setLevel(logging.INFO)
    LOG.addHandler(stale)
    LOG.addHandler(seen)
    try:
        say("candidate 1/3")
        to_log_files("stored in x")
    finally:
        LOG.removeHandler(stale)
        LOG.removeHandler(seen)
        LOG.setLevel(level)
        stale.close()
    assert seen.lines == ["candidate 1/3"]  # the console-like handler: not the file-only line
    assert not (tmp_path / "gone").exists()
