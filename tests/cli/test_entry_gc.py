"""The console scripts' entry points freeze the objects their imports made, once."""

from __future__ import annotations

import subprocess
import sys

DRIVER = """
import gc, sys
from mergebench.cli import entry
before = gc.get_freeze_count()
sys.argv = ["mergebench-leaderboard", "--help"]
try:
    entry.leaderboard()
except SystemExit:
    pass
first = gc.get_freeze_count()
entry._freeze_once()  # a second command in the same process: nothing more is frozen
print("counts", before, first, gc.get_freeze_count(), file=sys.stderr)
"""


def test_entry_point_freezes_import_time_objects_once():
    done = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    counts = next(line for line in done.stderr.splitlines() if line.startswith("counts"))
    before, first, again = (int(x) for x in counts.split()[1:])
    assert before == 0
    assert first > 10_000  # the command module's imports (Hydra, OmegaConf, ...)
    assert again == first
