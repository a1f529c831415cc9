"""Across-seed statistics on the boards: each zoo seed's latest run of a label, their mean and
sample std beside the latest run's numbers, in every format; single-seed boards unchanged."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re

import pytest

from mergebench.report.boards import build_boards, load_boards, run_seed, seed_mean_std
from mergebench.report.records import RunRecord, TaskScore
from mergebench.report.render import render
from mergebench.report.store import SQLiteStore

# Averages 70, 72, 77 over seeds 0, 1, 2: mean 73, deviations -3, -1, 4, squares sum 26,
# sample variance 26 / 2 = 13, std sqrt(13) = 3.6056 (ddof=0 would give 2.9439).
TIES = {0: (0.70, 0.70), 1: (0.74, 0.70), 2: (0.76, 0.78)}
MEAN, STD = 0.73, 0.036056
# per task: a = 70, 74, 76 -> mean 73.333, std 3.0551; b = 70, 70, 78 -> mean 72.667, std 4.6188
TASK_MEAN = {"a": 0.733333, "b": 0.726667}
TASK_STD = {"a": 0.030551, "b": 0.046188}


def add(store: SQLiteStore, label: str, values, seed: int | None = 0, tasks=("a", "b"),
        taskset="two", family="tiny", **method) -> None:  # fmt: skip
    config = {
        "method": {"name": label, **method},
        "model": family,
        "taskset": {"name": taskset, "tasks": list(tasks)},
    }
    if seed is not None:
        config["seed"] = seed
    store.add_run(
        RunRecord(
            method=label,
            label=label,
            family=family,
            taskset=taskset,
            config=config,
            scores=[TaskScore(t, "accuracy", v) for t, v in zip(tasks, values, strict=True)],
        )
    )


@pytest.fixture
def seeded(tmp_path):
    """individual and ties under seeds 0, 1, 2; emr under seed 0 only."""
    path = tmp_path / "r.sqlite"
    store = SQLiteStore(path)
    for seed, values in TIES.items():
        add(store, "individual", [0.9, 0.8 + seed / 100], seed=seed)
        add(store, "ties", values, seed=seed)
    add(store, "emr", [0.6, 0.5], seed=0)
    return path


def test_seed_mean_std_is_the_sample_std() -> None:
    mean, std = seed_mean_std([70.0, 72.0, 77.0])
    assert mean == pytest.approx(73.0) and std == pytest.approx(3.6056, abs=1e-4)
    assert seed_mean_std([70.0]) == (70.0, None)
    assert seed_mean_std([70.0, None]) == (None, None)
    assert seed_mean_std([]) == (None, None)


def test_run_seed_reads_the_config_and_defaults_to_zero() -> None:
    assert run_seed({"config": {"seed": 3}}) == 3
    assert run_seed({"config": {"seed": "2"}}) == 2
    assert run_seed({"config": {"seed": 1.0}}) == 1
    assert run_seed({"config": {}}) == 0
    assert run_seed({"config": {"seed": None}}) == 0


def test_three_seeds_mean_and_std_beside_the_latest_run(seeded) -> None:
    (board,) = load_boards(seeded)
    assert board.multi_seed
    ties = board.row("ties")
    assert ties.seeds == [0, 1, 2]
    assert ties.seed_mean == pytest.approx(MEAN) and ties.seed_std == pytest.approx(STD, abs=1e-6)
    assert ties.scores_seed_mean == pytest.approx(TASK_MEAN, abs=1e-6)
    assert ties.scores_seed_std == pytest.approx(TASK_STD, abs=1e-6)
    # the main numbers stay the latest run's (seed 2), normalized by the latest individual
    assert ties.average == pytest.approx(0.77)
    assert ties.scores == {"a": 0.76, "b": 0.78}
    assert ties.normalized["b"] == pytest.approx(0.78 / 0.82)
    emr = board.row("emr")  # run under one seed: its mean is its average, no std
    assert emr.seeds == [0] and emr.seed_mean == pytest.approx(0.55) and emr.seed_std is None
    assert board.row("individual").seeds == [0, 1, 2]


def test_a_rerun_of_a_seed_replaces_that_seeds_value(seeded) -> None:
    store = SQLiteStore(seeded)
    add(store, "ties", [0.80, 0.80], seed=1, k=0.5)  # another config of seed 1, run later
    ties = load_boards(seeded)[0].row("ties")
    # averages 70, 80, 77: mean 75.667, std sqrt(((-5.667)^2 + 4.333^2 + 1.333^2) / 2) = 5.1316
    assert ties.seeds == [0, 1, 2]
    assert ties.seed_mean == pytest.approx(0.756667, abs=1e-6)
    assert ties.seed_std == pytest.approx(0.051316, abs=1e-6)
    assert ties.average == pytest.approx(0.80)  # the latest run overall is the main row

    add(store, "ties", [0.72, 0.72], seed=1, k=0.5)  # the same config again: replaced in place
    ties = load_boards(seeded)[0].row("ties")
    assert ties.seed_mean == pytest.approx(MEAN) and ties.seed_std == pytest.approx(STD, abs=1e-6)


def test_task_subsets_and_task_sets_do_not_mix(seeded) -> None:
    store = SQLiteStore(seeded)
    add(store, "ties", [0.10], seed=0, tasks=("a",))  # the number-of-tasks experiment
    add(store, "ties", [0.30], seed=3, tasks=("a",))
    add(store, "ties", [0.10, 0.10], seed=5, taskset="other")
    boards = load_boards(seeded)
    full = next(b for b in boards if b.taskset == "two" and len(b.tasks) == 2)
    subset = next(b for b in boards if len(b.tasks) == 1)
    other = next(b for b in boards if b.taskset == "other")
    ties = full.row("ties")
    assert ties.seeds == [0, 1, 2] and ties.seed_mean == pytest.approx(MEAN)
    assert subset.row("ties").seeds == [0, 3]
    assert subset.row("ties").seed_mean == pytest.approx(0.2)
    assert subset.row("ties").seed_std == pytest.approx(0.141421, abs=1e-6)
    assert other.row("ties").seeds == [5] and not other.multi_seed


def test_seeds_across_stores(tmp_path) -> None:
    a, b = SQLiteStore(tmp_path / "a.sqlite"), SQLiteStore(tmp_path / "b.sqlite")
    add(a, "ties", [0.70, 0.70], seed=0)
    add(b, "ties", [0.80, 0.80], seed=1)
    (board,) = load_boards([tmp_path / "a.sqlite", tmp_path / "b.sqlite"])
    row = board.row("ties")
    assert row.seeds == [0, 1] and row.seed_mean == pytest.approx(0.75)


def test_all_runs_shows_each_seed_as_its_own_row(seeded) -> None:
    (board,) = load_boards(seeded, all_runs=True)
    labels = {r.label for r in board.rows if r.method == "ties"}
    assert labels == {"ties (seed=0)", "ties (seed=1)", "ties (seed=2)"}
    assert not board.multi_seed


def test_every_format_shows_mean_std_and_seed_count(seeded) -> None:
    boards = load_boards(seeded)

    md = render(boards, "markdown")
    header = next(line for line in md.splitlines() if line.startswith("| rank"))
    assert "| avg | 95% CI | seeds mean ± std | norm. avg |" in header
    ties_line = next(line for line in md.splitlines() if "| ties |" in line)
    assert "| 77.0 | — | 73.0 ± 3.6 (3 seeds) |" in ties_line
    assert "| 55.0 | — | 55.0 (1 seed) |" in md
    assert "sample std (n−1)" in md

    table = render(boards, "table")
    assert "73.0 ± 3.6 (3 seeds)" in table

    rows = list(csv.DictReader(io.StringIO(render(boards, "csv"))))
    avg = next(r for r in rows if r["label"] == "ties" and r["task"] == "average")
    # CSV numbers at the board's precision (0.1 points of a percentage: three decimals)
    assert avg["seed_mean"] == f"{MEAN:.3f}"
    assert avg["seed_std"] == f"{STD:.3f}" and avg["seeds"] == "0 1 2"
    task_b = next(r for r in rows if r["label"] == "ties" and r["task"] == "b")
    assert task_b["seed_std"] == f"{TASK_STD['b']:.3f}"
    emr = next(r for r in rows if r["label"] == "emr" and r["task"] == "average")
    assert emr["seed_std"] == "" and emr["seeds"] == "0"
    assert list(rows[0])[10:15] == ["ci_low", "ci_high", "seed_mean", "seed_std", "seeds"]

    data = json.loads(render(boards, "json"))["boards"][0]["rows"]
    ties = next(r for r in data if r["label"] == "ties")
    assert ties["seeds"] == [0, 1, 2] and ties["seed_mean"] == pytest.approx(MEAN)
    assert ties["seed_std"] == pytest.approx(STD, abs=1e-6)
    assert ties["scores_seed_std"] == pytest.approx(TASK_STD, abs=1e-6)

    page = render(boards, "html")
    assert "<th>seeds mean ± std</th>" in page
    assert "73.0 ± 3.6 (3 seeds)</td>" in page and "seeds 73.3 ± 3.1 (3 seeds)" in page
    # sortable: the seed cell sorts by the mean, and every row has a cell per header
    assert f"<td data-sort='{board_row_mean(boards, 'ties')}'>73.0 ± 3.6" in page
    table_html = page.split("<tbody>")[1].split("</tbody>")[0]
    n_headers = page.split("<thead>")[1].count("<th>")
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table_html):
        assert tr.count("<td") == n_headers


def board_row_mean(boards, label: str) -> float:
    return boards[0].row(label).seed_mean


OLD_MD_HEADER = (
    "| rank | method | a | b | avg | 95% CI | norm. avg | selected | merge s | select s "
    "| candidates | merge RSS MiB | artifact MiB | eval ex/s |"
)
OLD_CSV_HEADER = (
    "family,taskset,num_tasks,label,method,rank,tied_with_best,task,metric,value,ci_low,"
    "ci_high,normalized,published,selected,merge_seconds,peak_rss_mib,artifact_mib,"
    "eval_examples_per_second,selection_seconds,selection_candidates,merge_rss_mib"
)


@pytest.mark.parametrize("seed", [None, 0, 4])
def test_a_single_seed_board_renders_as_before(tmp_path, seed) -> None:
    path = tmp_path / "r.sqlite"
    store = SQLiteStore(path)
    add(store, "individual", [0.8, 0.5], seed=seed)
    add(store, "emr", [0.7, 0.4], seed=seed)
    add(store, "ties", [0.4, 0.5], seed=seed)
    add(store, "ties", [0.5, 0.5], seed=seed, k=0.5)  # a rerun of the same seed: no spread
    boards = load_boards(path)
    assert not boards[0].multi_seed and boards[0].row("ties").seeds == [seed or 0]

    md = render(boards, "markdown")
    assert OLD_MD_HEADER in md and "| 1 | emr | 70.0 | 40.0 | 55.0 | — | 83.7 |" in md
    assert "seed" not in md.lower()
    assert render(boards, "csv").splitlines()[0] == OLD_CSV_HEADER
    assert "seed" not in render(boards, "html").lower()
    assert "seed" not in render(boards, "table").lower()
    # exactly what a board without any seed information renders
    bare = [
        dataclasses.replace(
            b,
            rows=[
                dataclasses.replace(
                    r,
                    seeds=[],
                    seed_mean=None,
                    seed_std=None,
                    scores_seed_mean={},
                    scores_seed_std={},
                )  # fmt: skip
                for r in b.rows
            ],
        )
        for b in boards
    ]
    for fmt in ("markdown", "csv", "html", "table"):
        assert render(boards, fmt) == render(bare, fmt)
    data = json.loads(render(boards, "json"))["boards"][0]["rows"]
    emr = next(r for r in data if r["label"] == "emr")
    assert emr["seeds"] == [seed or 0] and emr["seed_mean"] == pytest.approx(0.55)
    assert emr["seed_std"] is None


def test_csv_columns_are_shared_by_all_boards(seeded) -> None:
    add(SQLiteStore(seeded), "emr", [0.6, 0.5], family="other")  # a single-seed board
    rows = list(csv.DictReader(io.StringIO(render(load_boards(seeded), "csv"))))
    other = next(r for r in rows if r["family"] == "other" and r["task"] == "average")
    assert other["seed_mean"] == "0.550" and other["seed_std"] == "" and other["seeds"] == "0"


def test_build_boards_without_seeds_counts_every_run_as_seed_zero() -> None:
    rows = [
        {"run_id": i, "method": "ties", "label": "ties", "family": "f", "taskset": "t",
         "task": "a", "metric": "accuracy", "value": v}
        for i, v in ((1, 0.5), (2, 0.7))
    ]  # fmt: skip
    (board,) = build_boards(rows)
    assert board.row("ties").seeds == [0] and board.row("ties").seed_mean == pytest.approx(0.7)
    (board,) = build_boards(rows, seeds={1: 0, 2: 1})
    assert board.row("ties").seeds == [0, 1] and board.row("ties").seed_mean == pytest.approx(0.6)
