"""Killed or interrupted mid-merge and mid-save: nothing of the user's lost, Ctrl-C is one
line (exit 130), and whatever a SIGKILL leaves behind goes with the next save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mergebench
from bad_input.conftest import BASE, HEAD, tree_hash

# Runs `mergebench-merge ARGS` with one phase slowed down and a flag file touched when that
# phase starts, so the test can signal it there (no timing guesswork).
DRIVER = r"""
import sys, time
from pathlib import Path
phase, flag, *argv = sys.argv[1:]

def mark():
    Path(flag).touch()

if phase == "merge":
    from mergebench.engine import stream
    real_map = stream.TaskVectorStream.map
    def slow_map(self, fn, description="merging", **options):
        def slow(item):
            mark()
            time.sleep(0.2)
            return fn(item)
        return real_map(self, slow, description, **options)
    stream.TaskVectorStream.map = slow_map
    from mergebench.engine import spans  # float32 files into an artifact go span by span
    real_read = spans.SpanBuffers.read
    def slow_read(self, sources, piece):
        mark()
        time.sleep(0.2)
        return real_read(self, sources, piece)
    spans.SpanBuffers.read = slow_read
else:
    from mergebench.results import kinds
    real_save = kinds.write_tensors
    def slow_save(*args, **kwargs):
        real_save(*args, **kwargs)
        mark()
        time.sleep(60)
    kinds.write_tensors = slow_save

from mergebench.cli.merge import main
sys.argv = ["mergebench-merge", "progress=false", *argv]
main()
"""


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".out."))


@pytest.mark.parametrize("phase", ["merge", "save"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_merge_loses_nothing(work, models, phase, sig):
    # An earlier result with the user's notes inside, and the user's files around it.
    result = mergebench.merge("emr", *models, exclude=HEAD, progress=False)
    result.save(work / "out")
    (work / "out" / "NOTES.md").write_text("keep\n")
    before = tree_hash(work)
    flag = work.parent / f"{work.name}.started"
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, phase, str(flag), *BASE, "output_dir=out"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 90
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the merge never started"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert [line for line in stderr.splitlines() if line.strip()] == [
            "mergebench-merge: interrupted"
        ]
        assert leftovers(work) == []
    else:
        assert proc.returncode == -signal.SIGKILL
        if phase == "save":
            assert leftovers(work), "a killed save leaves its temp folder (until the next save)"
    after = tree_hash(work)
    assert {k: v for k, v in after.items() if not k.startswith(".out.")} == before
    assert mergebench.load_result(work / "out").method == "emr"  # the old result, whole

    # The rerun: saves, removes what the killed run left, keeps the notes.
    rerun = mergebench.merge("ties", *models, exclude=HEAD, progress=False)
    rerun.save(work / "out")
    assert leftovers(work) == []
    assert (work / "out" / "NOTES.md").read_text() == "keep\n"
    assert mergebench.load_result(work / "out").method == "ties"
    os.unlink(flag)
