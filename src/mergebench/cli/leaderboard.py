"""`mergebench-leaderboard`: boards from the results database, as tables, files and plots."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mergebench.report.boards import (
    DEFAULT_DB,
    FORMATS,
    atomic_write,
    load_boards,
    print_table,
    render,
)
from mergebench.report.plots import write_all_plots
from mergebench.util.errors import MergeBenchError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mergebench-leaderboard",
        description="Methods x tasks leaderboards (average, normalized average, rank) "
        "from the mergebench results database.",
    )
    parser.add_argument(
        "--db",
        dest="stores",
        action="append",
        metavar="PATH",
        help=f"results database (SQLite file; default {DEFAULT_DB}); repeat to combine several",
    )
    parser.add_argument(
        "--store",
        dest="stores",
        action="append",
        metavar="URL",
        help="results store: a path, sqlite:///path or postgresql://user@host:port/db; "
        "repeatable, mixes with --db. A config stored in several counts once (latest wins)",
    )
    parser.add_argument("--family", help="only this model family (e.g. minilm)")
    parser.add_argument("--taskset", help="only this task set")
    parser.add_argument("--format", default="table", choices=FORMATS)
    parser.add_argument("--out", help="write to this file instead of standard output")
    parser.add_argument("--plots", metavar="DIR", help="also write the PNG plots into DIR")
    parser.add_argument(
        "--all-runs",
        action="store_true",
        help="a row per stored run, not per label (hyperparameter sweeps)",
    )
    args = parser.parse_args(argv)
    try:
        boards = load_boards(
            args.stores or [str(DEFAULT_DB)],
            family=args.family,
            taskset=args.taskset,
            all_runs=args.all_runs,
            strict=True,
        )
        if args.out:
            atomic_write(Path(args.out), render(boards, args.format))
            print(f"wrote {args.out}", file=sys.stderr)
        elif args.format == "table":
            print_table(boards)
        else:
            sys.stdout.write(render(boards, args.format))
        if args.plots:
            for path in write_all_plots(boards, args.plots):
                print(f"wrote {path}", file=sys.stderr)
    except MergeBenchError as exc:
        print(f"mergebench-leaderboard: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
