"""What `make bench` runs once the zoo exists: a Hydra multirun of `mergebench` over the
EMR paper's data-free variants on the text set and the vision set (reference rows come with
each job, evaluated once per zoo), then the leaderboard: printed, and written to
`outputs/leaderboard.md` and `outputs/leaderboard.json`.

    python scripts/run_bench.py                 # the paper's nine variants, both task sets
    python scripts/run_bench.py --data-free     # all twenty-one data-free rows
    python scripts/run_bench.py --jobs 2        # the sets side by side, one process each
    python scripts/run_bench.py --all           # plus DARE, the ten 2024-2025 methods,
                                                # model_stock and the data-dependent ones
    python scripts/run_bench.py --sets vision_vit --data-free   # the DINOv2 ViT board
    python scripts/run_bench.py --sets text --force --db /tmp/b.sqlite
    python scripts/run_bench.py --seeds 0,1,2   # one zoo per seed; boards add mean +- std

Runs already in the results database (same resolved config) are skipped, so an interrupted
sweep resumes; `--force` runs everything again.

Every job logs one W&B run (`logger=wandb`, unless an override says `logger=none`) next to
the database, `outputs/wandb/offline-run-*`: offline unless `WANDB_MODE` says otherwise, no
account needed; `wandb sync outputs/wandb/offline-run-*` uploads them. A job skipped as
stored logs its stored run, unless that run was logged before.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from mergebench.bench.variants import variants_in
from mergebench.report.wandb import resolve_mode

# Each variant's group is its `board:` key (conf/variant/<name>.yaml, mergebench.bench.variants).
PAPER_VARIANTS = variants_in("default")  # the EMR paper's Tables 7 and 8 rows
DARE_VARIANTS = variants_in("dare")  # DARE on task arithmetic and on TIES
NEW_METHOD_VARIANTS = variants_in("new")  # the 2024-2025 methods
DATA_FREE_VARIANTS = PAPER_VARIANTS + DARE_VARIANTS + NEW_METHOD_VARIANTS  # --data-free: 21
MERGEKIT_VARIANTS = variants_in("mergekit")  # model_stock (slerp merges two: no board): --all
ALL_DATA_FREE = DATA_FREE_VARIANTS + MERGEKIT_VARIANTS
DATA_DEPENDENT_VARIANTS = variants_in("data")  # their CPU presets: --all, a multirun of their own
# `make bench`: MiniLM on text and the DINOv2 ViT-S/14 on `vision_vit`, the paper's rows;
# `--all` (`make bench-all`) adds EfficientNet-Lite0 on `vision` and every other row
# (docs/benchmark.md: twenty-one rows on two sets do not fit 15 minutes on 2 cores).
SETS = {"text": "bench_text", "vision_vit": "bench_vision_vit", "vision": "bench_vision"}
DEFAULT_SETS = ["text", "vision_vit"]


def multirun(overrides: list[str]) -> None:
    """One Hydra multirun of the `mergebench` app in this process (jobs run one by one and
    share the loaded families and evaluation models)."""
    from hydra.core.global_hydra import GlobalHydra

    from mergebench.cli import bench

    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = ["mergebench", "--multirun", *overrides]
    try:
        bench.main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


def write_leaderboard(db: str, out_dir: str) -> list[Path]:
    """Print the leaderboard and write it as Markdown, JSON, CSV and HTML, and the plots
    into `<out_dir>/plots/` (mergebench.report.render, mergebench.report.plots)."""
    from mergebench.report.boards import load_boards
    from mergebench.report.plots import write_all_plots
    from mergebench.report.render import print_boards
    from mergebench.report.render import write_leaderboard as write

    boards = load_boards(db)
    print_boards(boards)
    plots = write_all_plots(boards, Path(out_dir) / "plots")  # first: the HTML embeds them
    formats = ("markdown", "json", "csv", "html")
    written = write(db, out_dir=out_dir, formats=formats, plot_dir=Path(out_dir) / "plots")
    return [*written.values(), *plots]


def child_argv(args: argparse.Namespace, name: str, threads: int | None) -> list[str]:
    """This script's arguments for one set's process: the Hydra overrides first (argparse
    takes positionals in one run), then the options, one set, no leaderboard."""
    overrides = [*args.overrides, *([f"threads={threads}"] if threads is not None else [])]
    return [
        *overrides, "--sets", name, "--jobs", "1", "--no-leaderboard",
        "--seeds", str(args.seeds), "--db", args.db, "--out", args.out,
        *(["--force"] if args.force else []), *(["--all"] if args.all else []),
        *(["--data-free"] if args.data_free else []), "--variants", *args.variants,
    ]  # fmt: skip


def run_in_parallel(children: dict[str, list[str]]) -> int:
    """Run this script once per task set (name -> its arguments), side by side, each
    child's output lines prefixed with its set's name. Returns the first non-zero exit
    code, or 0."""
    procs = {}
    for name, argv in children.items():
        command = [sys.executable, "-u", str(Path(__file__).resolve()), *argv]
        procs[name] = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )

    def forward(name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[{name}] {line}", end="", flush=True)

    readers = [threading.Thread(target=forward, args=item) for item in procs.items()]
    for reader in readers:
        reader.start()
    codes = {name: proc.wait() for name, proc in procs.items()}
    for reader in readers:
        reader.join()
    for name, code in codes.items():
        if code:
            print(f"run_bench: the {name} set failed (exit code {code})", file=sys.stderr)
    return next((code for code in codes.values() if code), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sets", nargs="+", default=None,
        help=f"of {', '.join(SETS)} (default: {' '.join(DEFAULT_SETS)}; with --all: all)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", nargs="+", default=PAPER_VARIANTS,
        help="data-free variants to run (default: the nine of the EMR paper's tables)",
    )  # fmt: skip
    parser.add_argument(
        "--data-free", action="store_true",
        help="every data-free row: also DARE on both bases and the ten 2024-2025 methods",
    )  # fmt: skip
    parser.add_argument(
        "--all", action="store_true",
        help="also DARE, the 2024-2025 methods, model_stock and the data-dependent methods",
    )  # fmt: skip
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="task sets run side by side, one process each with cores / sets torch threads "
        "unless `threads=` is given (on 2 cores two one-thread evaluations do about 1.17x "
        "the work of one two-thread evaluation: docs/benchmark.md)",
    )  # fmt: skip
    parser.add_argument("--no-leaderboard", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--seeds", default="0",
        help="comma-separated zoo seeds (data splits and fine-tuning), e.g. 0,1,2: every run "
        "is repeated per seed and the boards add the mean and std across seeds",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="rerun runs already stored")
    parser.add_argument("--db", default="outputs/results.sqlite", help="results database")
    parser.add_argument("--out", default="outputs", help="leaderboard folder")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args(argv)
    if args.sets is None:
        args.sets = list(SETS) if args.all else list(DEFAULT_SETS)
    # `--variants emr threads=1` hands the override to --variants: move KEY=VALUE items back.
    listed = [*args.sets, *args.variants]
    args.overrides = [v for v in listed if "=" in v] + list(args.overrides)
    args.sets = [s for s in args.sets if "=" not in s]
    args.variants = [v for v in args.variants if "=" not in v]
    if any(s not in SETS for s in args.sets):
        parser.error(f"--sets: choose from {', '.join(SETS)}")
    if args.jobs < 1:
        parser.error(f"--jobs: {args.jobs} is not an integer >= 1")
    seeds = [s.strip() for s in str(args.seeds).split(",")]
    if not all(s.isdigit() for s in seeds) or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds: {args.seeds!r} is not a list of distinct integers like 0,1,2")
    unknown = [v for v in args.variants if v not in ALL_DATA_FREE]
    if unknown:
        parser.error(
            f"--variants: unknown variant {unknown[0]!r} (choose from {', '.join(ALL_DATA_FREE)})"
        )

    start = time.perf_counter()
    if args.jobs > 1 and len(args.sets) > 1:
        # Every set at once, one process each (not a queue of `jobs`); on 2 cores two
        # one-thread evaluations do more work than one two-thread evaluation
        # (docs/benchmark.md, budget).
        user_threads = any(o.startswith("threads=") for o in args.overrides)
        threads = None if user_threads else max(1, (os.cpu_count() or 1) // len(args.sets))
        code = run_in_parallel({name: child_argv(args, name, threads) for name in args.sets})
        if code:
            return code
    else:
        common = [
            "+experiment=" + ",".join(SETS[s] for s in args.sets),
            f"store.path={args.db}",
            "progress=false",
            *([f"seed={','.join(seeds)}"] if seeds != ["0"] else []),
            *(["force=true"] if args.force else []),
            # W&B by default; an explicit `logger=...` is the user's (Hydra refuses two)
            *([] if any(o.startswith("logger=") for o in args.overrides) else ["logger=wandb"]),
            *args.overrides,
        ]
        variants = list(args.variants)
        if args.data_free or args.all:
            variants += [v for v in DARE_VARIANTS + NEW_METHOD_VARIANTS if v not in variants]
        if args.all:
            variants += [v for v in MERGEKIT_VARIANTS if v not in variants]
        multirun([*common, "+variant=" + ",".join(variants)])
        if args.all:
            multirun([*common, "+variant=" + ",".join(DATA_DEPENDENT_VARIANTS)])
    seconds = time.perf_counter() - start
    if args.no_leaderboard:
        print(f"benchmark runs took {seconds:.0f} s", file=sys.stderr)
        return 0
    for path in write_leaderboard(args.db, args.out):
        print(f"wrote {path}", file=sys.stderr)
    logger_wandb = not any(o == "logger=none" for o in args.overrides)
    if logger_wandb and resolve_mode(None) == "offline":
        runs = Path(args.db).parent / "wandb" / "offline-run-*"
        print(f"W&B runs (offline): {runs}; upload with: wandb sync {runs}", file=sys.stderr)
    print(f"benchmark runs took {seconds:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
