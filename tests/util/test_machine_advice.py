"""Issue 22.8: on a busy machine, leaving torch at all cores is several times slower than one
thread; the run says so (with the measured figure) instead of running slowly in silence."""

from __future__ import annotations

import io
import os
import sys

import pytest

from mergebench.util import machine


@pytest.mark.parametrize(
    ("threads", "cores", "load", "advised"),
    [
        (None, 2, 5.0, True),
        (None, 2, 2.0, True),  # load == cores: every core already taken
        (None, 2, 1.9, False),
        (1, 2, 5.0, False),  # the user chose
        (None, 1, 5.0, False),  # one core: nothing to choose
    ],
)
def test_advice_follows_the_documented_rule(monkeypatch, threads, cores, load, advised):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    advice = machine.busy_machine_advice(threads)
    assert (advice is not None) == advised
    if advised:
        assert f"load {load:.1f} on {cores} cores" in advice and "threads=1" in advice


def test_set_threads_says_it_on_a_terminal_only(monkeypatch):
    from mergebench.sources.zoo.build import set_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        set_threads(None)
        assert ("threads=1 is often several times faster" in stream.getvalue()) == shown
