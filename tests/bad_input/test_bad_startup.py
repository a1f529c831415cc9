"""Ctrl-C while a command is still starting (importing torch and friends takes seconds):
one line `<program>: interrupted` and exit 130, as at any later moment (issue 26)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bad_input.conftest import record

# Blocks the import of the command's module (a stand-in for slow imports) and touches a flag
# file there, so the test interrupts exactly during start-up.
DRIVER = r"""
import importlib.abc, sys, time
from pathlib import Path
entry_point, module, flag = sys.argv[1:]

class SlowImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == module:
            Path(flag).touch()
            time.sleep(60)
        return None

sys.meta_path.insert(0, SlowImport())
from mergebench.cli import entry
sys.exit(getattr(entry, entry_point)())
"""

COMMANDS = [
    ("bench", "mergebench.cli.bench", "mergebench"),
    ("merge", "mergebench.cli.merge", "mergebench-merge"),
    ("zoo", "mergebench.cli.zoo", "mergebench-zoo"),
    ("leaderboard", "mergebench.cli.leaderboard", "mergebench-leaderboard"),
    ("experiment", "mergebench.cli.experiments", "mergebench-experiment"),
    ("convert", "mergebench.cli.convert", "mergebench-convert"),
    ("export", "mergebench.cli.export", "mergebench-export"),
    ("evaluate", "mergebench.cli.evaluate", "mergebench-eval"),
]


@pytest.mark.parametrize(("entry_point", "module", "program"), COMMANDS)
def test_interrupt_during_start_up(tmp_path, entry_point, module, program):
    flag = tmp_path / "importing"
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, entry_point, module, str(flag)],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and lines == [f"{program}: interrupted"], err
    record(lines[0])


def test_console_scripts_go_through_the_guard():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    assert {value for value in scripts.values()} == {
        f"mergebench.cli.entry:{entry_point}" for entry_point, _, _ in COMMANDS
    }


def test_commands_keep_the_hub_off_unless_asked(tmp_path):
    # Before: `mergebench model=clip_vit_b32` without HF_HUB_OFFLINE in the environment went
    # to the network, although the README said the hub was off.
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    code = (
        "import sys; sys.argv = ['mergebench', 'model=clip_vit_b32', 'taskset=clip8', "
        "'store.path=null', 'references=false', 'hydra.run.dir=run']\n"
        "from mergebench.cli.entry import bench\nsys.exit(bench())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "the hub is switched off (HF_HUB_OFFLINE=1)" in lines[0]
    assert "model.checkpoints.pretrained" in lines[0]
    record(lines[0])
