"""`mergebench-leaderboard`: boards from the results database, as tables, files and plots."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mergebench.bench.identity import VOLATILE_KEYS
from mergebench.report.boards import DEFAULT_DB, Board, load_boards
from mergebench.report.plots import write_all_plots
from mergebench.report.render import FORMATS, atomic_write, print_boards, render
from mergebench.report.store import open_store
from mergebench.report.wandb import RunLogger, WandbLogger
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import file_in_the_way


def log_stored_runs(
    stores: Sequence[str],
    boards: Sequence[Board],
    family: str | None,
    taskset: str | None,
    logger: RunLogger,
) -> tuple[int, int]:
    """Log every stored run of the stores (scores, cost, config as stored) with the boards,
    each under its hash and once: a run logged before (by an earlier call, or by its job)
    is not logged again. Returns (logged now, logged before)."""
    logged = before = 0
    for spec in stores:
        store = open_store(spec, readonly=True)
        for run in store.runs(family=family, taskset=taskset):
            record = store.get_record(run["run_id"])
            record.extra.pop("outcomes", None)  # per-example predictions stay in the store
            key = run["config_hash"]
            if logger.log_run(record, boards, sweep_id=run.get("sweep_id"), key=key, once=True):
                logged += 1
            else:
                before += 1
    return logged, before


@contextmanager
def _writing(option: str, path: str) -> Iterator[None]:
    """An OS error while writing `path` (a file in the way, a read-only mount, a full disk)
    is one line naming the option, not a traceback."""
    try:
        yield
    except OSError as err:
        blocker = file_in_the_way(path)
        reason = f"{blocker} is a file, not a folder" if blocker else err.strerror or str(err)
        raise MergeBenchError(f"{option} {path}: cannot write ({reason})") from None


def as_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`family=minilm`, `all_runs=true` (the KEY=VALUE form the Hydra commands take) as
    `--family=minilm`, `--all-runs`, so both spellings work; a KEY that is no option of this
    command stays as it is and argparse names it."""
    flags = {
        opt.option_strings[0]: opt
        for opt in parser._actions  # argparse keeps no public list of its options
        if opt.option_strings and opt.option_strings[0].startswith("--")
    }
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        flag = "--" + key.replace("_", "-")
        if arg.startswith("-") or not sep or flag not in flags:
            out.append(arg)
        elif flags[flag].nargs == 0:  # a switch: true/false
            if value.lower() not in {"true", "false"}:
                parser.error(f"{key}: expected true or false, got {value!r}")
            out += [flag] if value.lower() == "true" else []
        else:
            out.append(f"{flag}={value}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mergebench-leaderboard",
        epilog="Every option also works as KEY=VALUE, as the Hydra commands take them "
        "(family=minilm format=markdown all_runs=true).",
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
    parser.add_argument("--format", default="table", choices=list(FORMATS))
    parser.add_argument("--out", help="write to this file instead of standard output")
    parser.add_argument("--plots", metavar="DIR", help="also write the PNG plots into DIR")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="log every stored run (and the boards) to W&B without recomputing anything, "
        "each once (W&B run id from the run's hash: a second call skips what is logged); "
        "offline unless WANDB_MODE says otherwise (files under --wandb-dir)",
    )
    parser.add_argument("--wandb-project", default="mergebench")
    parser.add_argument("--wandb-dir", default="outputs", help="where offline W&B runs go")
    parser.add_argument(
        "--all-runs",
        action="store_true",
        help="a row per stored run, not per label (hyperparameter sweeps)",
    )
    args = parser.parse_args(as_flags(parser, sys.argv[1:] if argv is None else argv))
    try:
        boards = load_boards(
            args.stores or [str(DEFAULT_DB)],
            family=args.family,
            taskset=args.taskset,
            all_runs=args.all_runs,
            strict=True,
            volatile_keys=VOLATILE_KEYS,
        )
        if args.out and Path(args.out).is_dir():
            raise MergeBenchError(f"--out {args.out}: is a folder; give the file to write")
        if args.plots:
            if Path(args.plots).exists() and not Path(args.plots).is_dir():
                raise MergeBenchError(f"--plots {args.plots}: exists and is not a folder")
            with _writing("--plots", args.plots):
                written = write_all_plots(boards, args.plots)
            for path in written:
                print(f"wrote {path}", file=sys.stderr)
        if args.out:
            with _writing("--out", args.out):
                atomic_write(Path(args.out), render(boards, args.format, args.plots))
            print(f"wrote {args.out}", file=sys.stderr)
        elif args.format == "table":
            print_boards(boards)
        else:
            sys.stdout.write(render(boards, args.format, args.plots))
        if args.wandb:
            logged, before = log_stored_runs(
                args.stores or [str(DEFAULT_DB)], boards, args.family, args.taskset,
                WandbLogger(project=args.wandb_project, dir=args.wandb_dir),
            )  # fmt: skip
            print(f"logged {logged} stored runs to W&B ({args.wandb_dir}); "
                  f"{before} logged before", file=sys.stderr)  # fmt: skip
    except MergeBenchError as exc:
        print(f"mergebench-leaderboard: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
