"""Measure the runs store and leaderboards: write throughput (one and several concurrent
writers), leaderboard build and render time, plots, and one offline W&B run.

    .venv/bin/python scripts/bench_store.py [--runs 2000] [--writers 4]

Synthetic records (8 tasks each, random scores); prints a Markdown table for docs/store.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import tempfile
import time
from pathlib import Path

from mergebench.report.boards import load_boards
from mergebench.report.records import RunRecord, TaskScore
from mergebench.report.render import render
from mergebench.report.store import SQLiteStore

TASKS = [f"task{i}" for i in range(8)]
LABELS = ["individual", "pretrained", "weight_averaging", "task_arithmetic", "ties", "emr"]


def make_record(i: int, rng: random.Random) -> RunRecord:
    label = LABELS[i % len(LABELS)]
    family = f"family{(i // len(LABELS)) % 5}"
    return RunRecord(
        method=label,
        label=label,
        family=family,
        taskset="eight",
        config={"method": {"name": label, "i": i}, "model": family, "seed": i},
        scores=[TaskScore(t, "accuracy", rng.random()) for t in TASKS],
        merge_seconds=rng.random(),
    )


def _write(path: str, start: int, n: int) -> None:
    store, rng = SQLiteStore(path), random.Random(start)
    for i in range(start, start + n):
        store.add_run(make_record(i, rng))


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=4)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one = str(Path(tmp) / "one.sqlite")
        s = timed(_write, one, 0, args.runs)
        rows.append(
            ("add_run, 1 writer", f"{args.runs} runs", f"{s:.2f} s", f"{args.runs / s:.0f} runs/s")
        )

        many = str(Path(tmp) / "many.sqlite")
        SQLiteStore(many)
        per = args.runs // args.writers
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_write, args=(many, w * per, per)) for w in range(args.writers)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        s = time.perf_counter() - t0
        stored = len(SQLiteStore(many).runs())
        assert stored == per * args.writers, f"lost runs: {stored}"
        rows.append((f"add_run, {args.writers} concurrent writers", f"{stored} runs, none lost",
                     f"{s:.2f} s", f"{stored / s:.0f} runs/s"))  # fmt: skip

        s = timed(SQLiteStore(one).has_run, "0" * 64)
        rows.append(("has_run (resume check)", "1 lookup", f"{1000 * s:.2f} ms", ""))

        t0 = time.perf_counter()
        boards = load_boards(one)
        s = time.perf_counter() - t0
        rows.append(
            ("load_boards", f"{args.runs} runs x 8 tasks", f"{s:.2f} s", f"{len(boards)} boards")
        )
        for fmt in ("markdown", "json", "csv", "html", "table"):
            s = timed(render, boards, fmt)
            rows.append((f"render {fmt}", f"{len(boards)} boards", f"{1000 * s:.0f} ms", ""))

        from mergebench.report.plots import write_all_plots

        t0 = time.perf_counter()
        written = write_all_plots(boards, Path(tmp) / "plots")
        s = time.perf_counter() - t0
        rows.append(("write_all_plots", f"{len(written)} PNGs", f"{s:.2f} s", ""))

        from mergebench.report.wandb import WandbLogger

        os.environ.pop("WANDB_MODE", None)
        logger = WandbLogger(dir=Path(tmp) / "wb")
        s = timed(logger.log_run, make_record(3, random.Random(0)), boards[:1])
        rows.append(("W&B log_run (offline)", "1 run + table", f"{s:.2f} s", ""))

    print("| operation | size | time | rate |")
    print("| --- | --- | ---: | ---: |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
