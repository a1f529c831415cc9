"""Leaderboards: averages, normalization, ranks, filters, formats, published column."""

from __future__ import annotations

import csv
import io
import json

import pytest

from mergebench.cli.leaderboard import main
from mergebench.report.boards import build_boards, load_boards
from mergebench.report.published import canonical_label, find_setting
from mergebench.report.records import RunRecord, TaskScore
from mergebench.report.render import render, write_leaderboard
from mergebench.report.store import SQLiteStore

TASKS = ("a", "b")


def add(store: SQLiteStore, label: str, values, method=None, family="tiny", taskset="two",
        tasks=TASKS, metric="accuracy", **config) -> None:  # fmt: skip
    store.add_run(
        RunRecord(
            method=method or label,
            label=label,
            family=family,
            taskset=taskset,
            config={
                "method": {"name": method or label, **config},
                "model": family,
                "taskset": {"name": taskset, "tasks": list(tasks)},
            },
            scores=[TaskScore(t, metric, v) for t, v in zip(tasks, values, strict=True)],
        )
    )


@pytest.fixture
def db(tmp_path):
    store = SQLiteStore(tmp_path / "r.sqlite")
    add(store, "individual", [0.8, 0.5])
    add(store, "pretrained", [0.2, 0.1])
    add(store, "ties", [0.4, 0.5])
    add(store, "emr", [0.7, 0.4])
    add(store, "task_arithmetic", [0.6, 0.2])
    add(store, "weight_averaging", [0.4, 0.5], variant=1)  # ties with ties' average
    add(store, "emr", [0.6, 0.3], family="other")
    return tmp_path / "r.sqlite"


def test_average_normalized_and_rank(db) -> None:
    boards = load_boards(db, family="tiny")
    (board,) = boards
    assert board.tasks == ["a", "b"] and board.metrics == {"a": "accuracy", "b": "accuracy"}
    labels = [r.label for r in board.rows]
    # references first, then methods by rank
    assert labels[:2] == ["individual", "pretrained"]
    emr, ta = board.row("emr"), board.row("task_arithmetic")
    assert emr.average == pytest.approx(0.55)
    assert emr.normalized == {"a": pytest.approx(0.875), "b": pytest.approx(0.8)}
    assert emr.normalized_average == pytest.approx(0.8375)
    assert emr.rank == 1
    # ties and weight_averaging have equal averages (0.45): both rank 2, next rank is 4
    assert board.row("ties").rank == board.row("weight_averaging").rank == 2
    assert ta.rank == 4
    assert board.row("individual").rank is None
    assert board.row("individual").normalized_average == pytest.approx(1.0)


def test_latest_run_of_a_label_wins(db) -> None:
    add(SQLiteStore(db), "ties", [0.9, 0.9], k=0.5)  # another config, same label
    board = load_boards(db, family="tiny")[0]
    assert board.row("ties").average == pytest.approx(0.9)
    assert board.row("ties").rank == 1


def test_all_runs_names_sweep_points_by_what_differs(db) -> None:
    store = SQLiteStore(db)
    add(store, "ties", [0.9, 0.9], k=0.5)  # same label as the fixture's ties run, new config
    boards = load_boards(db, family="tiny", all_runs=True)
    labels = {r.label for r in boards[0].rows}
    assert {"ties (method.k=-)", "ties (method.k=0.5)"} <= labels
    assert "emr" in labels  # a label run once keeps its name


def test_subset_boards_are_separate_and_normalized_per_task(db) -> None:
    add(SQLiteStore(db), "emr", [0.4], tasks=("a",))
    boards = load_boards(db, family="tiny")
    assert [len(b.tasks) for b in boards] == [2, 1]
    small = boards[1]
    assert [r.label for r in small.rows] == ["emr"]
    assert small.row("emr").normalized_average == pytest.approx(0.5)  # 0.4 / individual 0.8


def test_missing_task_gives_no_average(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "r.sqlite")
    add(store, "ties", [0.5, 0.5])
    store.add_run(
        RunRecord("emr", "emr", "tiny", "two", {"x": 1}, [TaskScore("a", "accuracy", 0.5)])
    )
    # emr lacks task b, so it sits on its own one-task board instead of faking an average
    boards = load_boards(tmp_path / "r.sqlite")
    assert sorted(len(b.tasks) for b in boards) == [1, 2]


def test_formats(db) -> None:
    boards = load_boards(db)
    md = render(boards, "markdown")
    assert "## tiny / two (2 tasks)" in md and "| 1 | emr | 70.0 | 40.0 | 55.0 | — | 83.7 |" in md

    rows = list(csv.DictReader(io.StringIO(render(boards, "csv"))))
    emr_avg = next(
        r for r in rows if r["label"] == "emr" and r["family"] == "tiny" and r["task"] == "average"
    )
    assert float(emr_avg["value"]) == pytest.approx(0.55) and emr_avg["rank"] == "1"

    data = json.loads(render(boards, "json"))
    tiny = next(b for b in data["boards"] if b["family"] == "tiny")
    assert {r["label"]: r["rank"] for r in tiny["rows"]}["task_arithmetic"] == 4

    page = render(boards, "html")
    assert page.startswith("<!doctype html>") and "<td" in page and "emr" in page
    assert "tiny / two" in render(boards, "table")


def test_cli_formats_filters_and_errors(db, tmp_path, capsys) -> None:
    assert main(["--db", str(db), "--format", "json", "--family", "other"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [b["family"] for b in data["boards"]] == ["other"]

    out = tmp_path / "lb.html"
    assert main(["--db", str(db), "--format", "html", "--out", str(out)]) == 0
    assert "<table class='board'>" in out.read_text()

    assert main(["--db", str(tmp_path / "missing.sqlite")]) == 2
    assert "missing.sqlite" in capsys.readouterr().err


def test_write_leaderboard_for_the_bench_job(db, tmp_path) -> None:
    written = write_leaderboard(db, tmp_path / "out")
    assert set(written) == {"markdown", "json"}
    assert written["markdown"].name == "leaderboard.md"
    assert json.loads(written["json"].read_text())["boards"]
    assert not list((tmp_path / "out").glob(".*tmp"))  # temp files renamed away


def test_published_column_where_setting_matches(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "r.sqlite")
    tasks = ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
    add(store, "emr", [0.7] * 8, family="clip-vit-b32", taskset="vision8", tasks=tasks)
    add(store, "emr w/o mask", [0.6] * 8, method="emr", family="clip-vit-b32",
        taskset="vision8", tasks=tasks)  # fmt: skip
    add(store, "emr", [0.7] * 2, family="tiny", taskset="two")
    boards = {b.family: b for b in load_boards(tmp_path / "r.sqlite")}
    clip = boards["clip-vit-b32"]
    assert clip.published_setting == "vit-b32-8"
    assert clip.row("emr").published_average == pytest.approx(0.887)
    assert clip.row("emr").published_scores["stanford_cars"] == pytest.approx(0.728)
    assert clip.row("emr w/o mask").published_average == pytest.approx(0.719)  # Elect & Rescale
    assert boards["tiny"].published_setting is None
    # four of the eight tasks is not the paper's setting: no published column
    add(store, "emr", [0.7] * 4, family="clip-vit-b32", taskset="vision8", tasks=tasks[:4])
    subset = [b for b in load_boards(tmp_path / "r.sqlite") if len(b.tasks) == 4]
    assert subset and subset[0].published_setting is None
    assert "published avg" in render([clip], "markdown")
    assert "published avg" not in render([boards["tiny"]], "markdown")


def test_published_lookup() -> None:
    roberta = find_setting("roberta-base", "glue8")
    assert roberta is not None and roberta.unit == "fraction"
    # the paper gives RoBERTa per task only: the average is the mean of its eight numbers
    assert roberta.average_for("emr") == pytest.approx(
        (0.3996 + 0.9335 + 0.8627 + 0.8277 + 0.8972 + 0.8545 + 0.8957 + 0.7437) / 8
    )
    assert roberta.task_score_for("ties", "STS-B") == pytest.approx(0.5819)
    assert find_setting("gpt2", "glue7").average_for("Task Arithmetic") == pytest.approx(0.70)
    assert canonical_label("ties w/ M&R") == "ties w/ M&R"
    assert canonical_label("unknown-method") is None
    assert find_setting("minilm", "text6") is None


def test_build_boards_empty() -> None:
    assert build_boards([]) == []
    assert "No results" in render([], "markdown")


@pytest.mark.parametrize(
    ("model", "taskset", "setting"),
    [
        ("clip_vit_b32", "clip8", "vit-b32-8"),
        ("clip_vit_l14", "clip8", "vit-l14-8"),
        ("roberta_base", "glue8", "roberta-glue8"),
        ("gpt2", "glue7", "gpt2-glue7"),
        ("clip_vit_b16", "clip8", None),  # the paper's B/16 setting is ViT-B/16 on 30 tasks
        ("minilm", "text", None),
    ],
)
def test_configured_paper_settings_get_published_numbers(model, taskset, setting) -> None:
    """The names in conf/model and conf/taskset (what runs record) find the paper setting."""
    from omegaconf import OmegaConf

    from mergebench.util.config import conf_dir

    name = OmegaConf.load(conf_dir() / "model" / f"{model}.yaml").name
    ts = OmegaConf.load(conf_dir() / "taskset" / f"{taskset}.yaml")
    found = find_setting(name, ts.name, len(ts.tasks))
    assert (found.key if found else None) == setting
    if found and found.task_aliases:
        assert all(found.task_index(t) is not None for t in ts.tasks)


def _outcomes(correct_a: int, correct_b: int, n: int = 200) -> dict:
    """Accuracy outcomes whose first `correct_*` examples are right (labels all 1)."""
    return {
        task: {
            "metric": "accuracy",
            "classes": 2,
            "pred": [1] * correct + [0] * (n - correct),
            "label": [1] * n,
        }
        for task, correct in (("a", correct_a), ("b", correct_b))
    }


def test_boards_carry_intervals_ties_selection_and_cost(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite")
    rows = {"emr": (180, 170), "ties": (179, 170), "weight_averaging": (120, 100)}
    for label, (ca, cb) in rows.items():
        store.add_run(
            RunRecord(
                method=label, label=label, family="tiny", taskset="two",
                config={"method": {"name": label}},
                scores=[TaskScore("a", "accuracy", ca / 200), TaskScore("b", "accuracy", cb / 200)],
                merge_seconds=1.5, peak_rss_bytes=3 * 2**20, artifact_bytes=2**20,
                extra={"outcomes": _outcomes(ca, cb), "examples_per_second": 400.0,
                       "selected": {"scaling": 0.5} if label == "ties" else {}},
            )
        )  # fmt: skip
    (board,) = load_boards(tmp_path / "s.sqlite")
    emr, ties, wa = board.row("emr"), board.row("ties"), board.row("weight_averaging")
    # One example apart: tied with the best, sharing rank 1; averaging is clearly worse.
    assert (emr.rank_label, ties.rank_label, wa.rank_label) == ("1=", "1=", "3")
    assert emr.tied_with_best and ties.tied_with_best and wa.tied_with_best is False
    low, high = emr.average_ci
    assert low <= emr.average <= high and high - low > 0.01
    assert set(emr.scores_ci) == {"a", "b"}
    assert ties.selected == {"scaling": 0.5} and emr.selected == {}
    assert emr.cost == {
        "merge_seconds": 1.5, "peak_rss_mib": 3.0, "artifact_mib": 1.0,
        "eval_examples_per_second": 400.0,
        # stored without `extra["cost"]` (as before it existed): blank, not zero
        "selection_seconds": None, "selection_candidates": None, "merge_rss_mib": None,
    }  # fmt: skip
    data = json.loads(render([board], "json"))["boards"][0]["rows"]
    row = next(r for r in data if r["label"] == "ties")
    assert row["tied_with_best"] is True and row["selected"] == {"scaling": 0.5}
    assert len(row["average_ci"]) == 2 and set(row["cost"]) == set(emr.cost)
    md = render([board], "markdown")
    assert "| 1= | emr |" in md and "scaling=0.5" in md


def test_papercuts_csv_precision_html_caption_narrow_terminal(db, monkeypatch) -> None:
    """Issue 22.10: CSV numbers at the board's precision, no literal backticks in the HTML
    caption, and a narrow terminal drops the cost columns instead of cutting task names."""
    import rich.console

    from mergebench.report.render import print_boards

    boards = load_boards(db)
    rows = list(csv.DictReader(io.StringIO(render(boards, "csv"))))
    emr_a = next(
        r for r in rows if r["label"] == "emr" and r["family"] == "tiny" and r["task"] == "a"
    )
    assert emr_a["value"] == "0.700" and emr_a["normalized"] == "0.875"

    page = render(boards, "html")
    caption = page.split("<p class='cap'>")[1].split("</p>")[0]
    assert "`" not in caption and "<code>k=</code>" in caption

    real = rich.console.Console

    def terminal_table(width: int) -> str:
        def console(*args, **kwargs):
            return real(*args, **{**kwargs, "width": width, "force_terminal": True})

        monkeypatch.setattr(rich.console, "Console", console)
        out = io.StringIO()
        print_boards(boards, file=out)
        return out.getvalue()

    narrow, wide = terminal_table(70), terminal_table(300)
    assert "…" not in narrow and "merge s" not in narrow and "cost columns hidden" in narrow
    assert "merge s" in wide and "cost columns hidden" not in wide


def test_cli_takes_key_value_like_the_hydra_commands(db, tmp_path, capsys) -> None:
    """Issue 22.10: `mergebench-leaderboard family=tiny format=csv` as well as --flags."""
    out = tmp_path / "lb.csv"
    assert main([f"db={db}", "family=tiny", "format=csv", f"out={out}"]) == 0
    flags = tmp_path / "flags.csv"
    assert main(["--db", str(db), "--family", "tiny", "--format", "csv", "--out", str(flags)]) == 0
    assert out.read_text() == flags.read_text() and "other" not in out.read_text()
    assert main([f"db={db}", "all_runs=true", "format=markdown"]) == 0
    with pytest.raises(SystemExit) as exit_:
        main([f"db={db}", "all_runs=maybe"])
    assert exit_.value.code == 2 and "all_runs: expected true or false" in capsys.readouterr().err
