"""Issue 22.7: long work says how far it is. Validation selection a line per candidate,
RegMean/Fisher a line per task, AdaMerging a line every N steps when no terminal is attached
(a bar when one is); under Hydra the lines land in the job's log `bench.log`."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
from data_toys import mlp_pool
from fake_job import FakeJob
from test_costs import GRID, slow_selection_merges

from mergebench.api import merge_pool
from mergebench.bench import protocol
from mergebench.cli import bench as bench_cli
from mergebench.report.records import TaskScore
from mergebench.util import progress


@pytest.fixture(autouse=True)
def plain_logging(monkeypatch):
    """No logging set up (as outside Hydra), whatever an earlier in-process Hydra run left."""
    root, level = logging.getLogger(), logging.getLogger().level
    monkeypatch.setattr(root, "handlers", [])
    root.setLevel(logging.WARNING)  # setLevel, not the attribute: it clears isEnabledFor's cache
    yield
    logging.getLogger("mergebench").handlers.clear()
    root.setLevel(level)


def validate(result) -> list[TaskScore]:
    return [TaskScore("a", "accuracy", 0.5, "validation")]


def select_ties(progress_on: bool = True):
    return protocol.select(
        "ties", {}, "pool", validate, progress=progress_on,
        search={"k": [0.1, 0.2, 0.3], "scaling": []},
    )  # fmt: skip


def candidate_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("ties: validation: ")]


def test_selection_prints_a_line_per_candidate_without_a_terminal(monkeypatch, capsys):
    slow_selection_merges(monkeypatch, 0.0)
    selection = select_ties()
    lines = candidate_lines(capsys.readouterr().err)
    assert len(lines) == len(selection.candidates) == 3
    for n, (line, k) in enumerate(zip(lines, ("0.1", "0.2", "0.3"), strict=True), start=1):
        assert line.startswith(f"ties: validation: {n}/3 candidates, ")
        assert f"k={k}: validation 0.5000 in " in line and line.endswith(" s")
    assert selection.evaluated == 3 and selection.seconds >= 0


def test_selection_shows_a_bar_on_a_terminal(monkeypatch, capsys):
    slow_selection_merges(monkeypatch, 0.0)
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    select_ties()
    err = capsys.readouterr().err
    assert "\r" in err and "/3 [" in err and "candidate/s" in err  # tqdm's bar
    assert not re.search(r"\d/3 candidates, ", err)  # and no plain lines beside it


def test_no_progress_prints_nothing(monkeypatch, capsys):
    slow_selection_merges(monkeypatch, 0.0)
    select_ties(progress_on=False)
    assert candidate_lines(capsys.readouterr().err) == []


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_statistics_print_a_line_per_task(method, capsys):
    pool, _ = mlp_pool(tasks=("a", "b", "c"), classes=(3, 3, 3))
    merge_pool(method, pool, progress=True, num_examples=8, batch_size=4)
    desc = "regmean: grams" if method == "regmean" else "fisher"
    lines = re.findall(rf"^{desc}: \d+/.*$", capsys.readouterr().err, re.M)
    assert [line.split(",")[0] for line in lines] == [f"{desc}: {n}/3 tasks" for n in (1, 2, 3)]
    assert [line.rsplit(", ", 1)[1] for line in lines] == ["a done", "b done", "c done"]


def test_adamerging_prints_a_line_every_n_steps(capsys):
    pool, _ = mlp_pool(tasks=("a", "b"), classes=(3, 4), examples=16)
    merge_pool("adamerging", pool, progress=True, steps=20, accelerator="cpu", batch_size=8)
    lines = re.findall(r"^adamerging: \d+/.*$", capsys.readouterr().err, re.M)
    assert [line.split(",")[0] for line in lines] == [
        f"adamerging: {n}/20 steps" for n in range(2, 21, 2)
    ]
    assert all(", entropy " in line for line in lines)


def test_lines_reach_log_files_but_not_the_console_beside_a_bar(tmp_path, monkeypatch, capsys):
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stdout)
    log_file = logging.FileHandler(tmp_path / "job.log")
    monkeypatch.setattr(root, "handlers", [console, log_file])
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    with progress.stage(2, "work", unit="step", every=1) as bar:
        bar.update()
        bar.update()
    log_file.close()
    assert (tmp_path / "job.log").read_text().splitlines()[-1].startswith("work: 2/2 steps, ")
    assert "work: 2/2 steps, " not in capsys.readouterr().out  # the bar stands for it there


def test_a_hydra_run_writes_its_lines_to_bench_log(tmp_path, monkeypatch, capsys):
    # The job log was 0 bytes: every line went to print, none to the logger Hydra sets up.
    FakeJob(monkeypatch)
    slow_selection_merges(monkeypatch, 0.0)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "mergebench", "method=ties", GRID, "references=false", "progress=true",
        f"store.path={tmp_path / 'results.sqlite'}", f"hydra.run.dir={run_dir}",
    ])  # fmt: skip
    saved = logging.getLogger().handlers[:]
    try:
        bench_cli.main()
    finally:
        for handler in logging.getLogger().handlers:
            if handler not in saved:
                handler.close()
    log = (Path(run_dir) / "bench.log").read_text()
    messages = "\n".join(line.split(" - ", 1)[-1] for line in log.splitlines())  # less Hydra's
    assert len(candidate_lines(messages)) == 3  # `[time][logger][INFO] - ` prefix
    assert "ties: selected {'k': 0.1} on validation" in log
    assert "stored in" in log and "merge " in log
