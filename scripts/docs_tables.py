"""Write the leaderboards of a real benchmark run into docs/benchmark.md, stamped with the
date, the commit and the machine, between the markers `<!-- boards:start -->` and
`<!-- boards:end -->` (nothing else of the file changes).

    python scripts/docs_tables.py                       # from outputs/results.sqlite
    python scripts/docs_tables.py --db other.sqlite --doc docs/benchmark.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path

START, END = "<!-- boards:start -->", "<!-- boards:end -->"


def stamp(db: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "unknown"  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`scripts/docs_tables.py` from `{db}`; commit {commit}{' (with local changes)' if dirty else ''}; "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}; load average at generation {load[0]:.1f}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="outputs/results.sqlite")
    parser.add_argument("--doc", default="docs/benchmark.md")
    args = parser.parse_args(argv)

    from mergebench.report.boards import load_boards
    from mergebench.report.render import to_markdown

    boards = load_boards(args.db)
    body = to_markdown(boards).split("\n", 2)[2]  # without the page title
    section = f"{START}\n{stamp(args.db)}\n\n{body.strip()}\n{END}"
    doc = Path(args.doc)
    text = doc.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
    print(f"wrote {len(boards)} boards into {doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
