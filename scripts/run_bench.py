"""What `make bench` runs once the zoo exists: a Hydra multirun of `mergebench` over every
data-free method and variant on the text set and the vision set (reference rows come with
each job, evaluated once per zoo), then the leaderboard: printed, and written to
`outputs/leaderboard.md` and `outputs/leaderboard.json`.

    python scripts/run_bench.py                 # data-free methods, both task sets
    python scripts/run_bench.py --all           # plus DARE, the ten 2024-2025 methods,
                                                # model_stock and the data-dependent ones
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
import sys
import time
from pathlib import Path

from mergebench.bench.variants import variants_in
from mergebench.report.wandb import resolve_mode

# Each variant's group is its `board:` key (conf/variant/<name>.yaml, mergebench.bench.variants).
DATA_FREE_VARIANTS = variants_in("default")  # make bench
SLOW_VARIANTS = variants_in("slow")  # DARE: --all
NEW_METHOD_VARIANTS = variants_in("new")  # the 2024-2025 methods: --all
MERGEKIT_VARIANTS = variants_in("mergekit")  # model_stock (slerp merges two: no board): --all
ALL_DATA_FREE = DATA_FREE_VARIANTS + SLOW_VARIANTS + NEW_METHOD_VARIANTS + MERGEKIT_VARIANTS
DATA_DEPENDENT_VARIANTS = variants_in("data")  # their CPU presets: --all, a multirun of their own
# `vision_vit` (the DINOv2 ViT-S/14 board) runs by name: not yet on `make bench`
# (docs/benchmark.md: its zoo's budget and its Fashion-MNIST fine-tune are open).
SETS = {"text": "bench_text", "vision": "bench_vision", "vision_vit": "bench_vision_vit"}
DEFAULT_SETS = ["text", "vision"]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sets", nargs="+", default=DEFAULT_SETS,
        help=f"of {', '.join(SETS)} (default: {' '.join(DEFAULT_SETS)})",
    )  # fmt: skip
    parser.add_argument(
        "--variants", nargs="+", default=DATA_FREE_VARIANTS,
        help="data-free variants to run (default: the eleven of the EMR paper's tables)",
    )  # fmt: skip
    parser.add_argument(
        "--data-free", action="store_true",
        help="every data-free row: also DARE on both bases and the ten 2024-2025 methods",
    )  # fmt: skip
    parser.add_argument(
        "--all", action="store_true",
        help="also the 2024-2025 methods and the data-dependent methods",
    )  # fmt: skip
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
    # `--variants emr threads=1` hands the override to --variants: move KEY=VALUE items back.
    listed = [*args.sets, *args.variants]
    args.overrides = [v for v in listed if "=" in v] + list(args.overrides)
    args.sets = [s for s in args.sets if "=" not in s]
    args.variants = [v for v in args.variants if "=" not in v]
    if any(s not in SETS for s in args.sets):
        parser.error(f"--sets: choose from {', '.join(SETS)}")
    seeds = [s.strip() for s in str(args.seeds).split(",")]
    if not all(s.isdigit() for s in seeds) or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds: {args.seeds!r} is not a list of distinct integers like 0,1,2")

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
    start = time.perf_counter()
    unknown = [v for v in args.variants if v not in ALL_DATA_FREE]
    if unknown:
        parser.error(
            f"--variants: unknown variant {unknown[0]!r} (choose from {', '.join(ALL_DATA_FREE)})"
        )
    variants = list(args.variants)
    if args.data_free:
        variants += [v for v in SLOW_VARIANTS + NEW_METHOD_VARIANTS if v not in variants]
    if args.all:
        extra = SLOW_VARIANTS + NEW_METHOD_VARIANTS + MERGEKIT_VARIANTS
        variants += [v for v in extra if v not in variants]
    multirun([*common, "+variant=" + ",".join(variants)])
    if args.all:
        multirun([*common, "+variant=" + ",".join(DATA_DEPENDENT_VARIANTS)])
    seconds = time.perf_counter() - start
    for path in write_leaderboard(args.db, args.out):
        print(f"wrote {path}", file=sys.stderr)
    if "logger=wandb" in common and resolve_mode(None) == "offline":
        runs = Path(args.db).parent / "wandb" / "offline-run-*"
        print(f"W&B runs (offline): {runs}; upload with: wandb sync {runs}", file=sys.stderr)
    print(f"benchmark runs took {seconds:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
