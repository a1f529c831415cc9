"""A Ctrl-C while numba compiles in the main thread is not lost: raised inside llvmlite's
ctypes callback, Python printed and dropped it, and an interrupted `mergebench-merge` went on
to exit 0 (seen on a fresh numba cache in CI). `kernels.warm_up` holds SIGINT until the
compile ends, then raises it."""

from __future__ import annotations

import contextlib
import os
import signal

import numpy as np
import pytest

from mergebench.engine import kernels
from mergebench.util.fs import interrupts_deferred


def test_sigint_inside_the_block_is_raised_when_it_ends():
    reached_end_of_block = False
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        reached_end_of_block = True
    assert reached_end_of_block
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_warm_up_raises_a_sigint_received_while_it_compiles(monkeypatch):
    def compile_then_interrupted(values: np.ndarray) -> None:
        # What ctypes does with an exception raised inside a callback: print it, drop it.
        with contextlib.suppress(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-"compile"

    monkeypatch.setattr(kernels, "_warm", False)
    monkeypatch.setattr(kernels, "_noop", compile_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        kernels.warm_up()
    assert kernels._warm is False  # the next merge warms up again
