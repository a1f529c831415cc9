"""Issue 22.6: a row's costs mean what they say. Merge seconds are the final merge's; the
validation selection's seconds and candidates are recorded beside them; the memory figure is
the merge's own peak above what the process held as it began (the process's figures kept in
the run); rows stored before these existed show blanks."""

from __future__ import annotations

import mmap
import time

import torch
from fake_job import FakeJob, bench_cfg, stored_runs

from mergebench.bench import job, protocol
from mergebench.report.boards import load_boards
from mergebench.report.records import RunRecord, TaskScore
from mergebench.report.render import render
from mergebench.report.store import SQLiteStore
from mergebench.util.memory import PeakRSS

MiB = 2**20
GRID = "method.search.scaling=[]"  # k: three candidates, no scaling shortcut


def slow_selection_merges(monkeypatch, seconds: float = 0.02) -> list[dict]:
    """The protocol's merges, each taking `seconds`; returns the list they are counted in."""
    merges: list[dict] = []

    def merge(name, pool, device, progress, **params):
        time.sleep(seconds)
        merges.append(params)
        return object()

    monkeypatch.setattr(protocol, "merge_pool", merge)
    return merges


def test_selection_seconds_and_candidates_are_stored_and_shown(tmp_path, monkeypatch):
    FakeJob(monkeypatch)
    merges = slow_selection_merges(monkeypatch)
    job.run(bench_cfg(tmp_path, "method=ties", "protocol.select=true", GRID), [GRID])
    assert len(merges) == 3
    (run,) = stored_runs(tmp_path)
    cost = run["extra"]["cost"]
    assert cost["selection_candidates"] == 3
    assert cost["selection_seconds"] >= 0.06  # three merges of 0.02 s at least
    assert run["merge_seconds"] < cost["selection_seconds"]  # the final merge only

    (board,) = load_boards(tmp_path / "results.sqlite")
    (row,) = board.rows
    assert row.cost["selection_candidates"] == 3
    assert row.cost["selection_seconds"] == cost["selection_seconds"]
    md = render([board], "markdown")
    assert "| select s | candidates | merge RSS MiB |" in md
    assert "select s, candidates: the validation selection" in md  # the legend says what
    assert f"| {cost['selection_seconds']:.1f} | 3 |" in md
    csv_lines = render([board], "csv").splitlines()
    header = csv_lines[0].split(",")
    values = csv_lines[1].split(",")
    assert values[header.index("selection_candidates")] == "3"
    assert "<th>candidates</th>" in render([board], "html")
    assert "candidates" in render([board], "table")


def fresh_pages(size: int) -> mmap.mmap:
    """`size` bytes of new resident memory: an anonymous mapping, every page written. (A
    `torch.ones` of that size may come from memory the allocator already holds after
    earlier tests, which adds nothing to the resident size.)"""
    pages = mmap.mmap(-1, size)
    pages.write(b"\x01" * size)
    return pages


def test_the_merges_own_peak_leaves_out_what_the_process_held_before(tmp_path, monkeypatch):
    fake = FakeJob(monkeypatch)

    def merge(name, pool, device, progress, **params):  # a merge that holds ~64 MiB a while
        fake.merges.append(params)
        work = fresh_pages(64 * MiB)
        time.sleep(0.1)  # the sampler (every 5 ms) sees it
        work.close()
        return object()

    monkeypatch.setattr(job, "merge_pool", merge)
    held = torch.ones(200 * MiB // 4)  # resident before the merge began
    job.run(bench_cfg(tmp_path))
    (run,) = stored_runs(tmp_path)
    cost = run["extra"]["cost"]
    assert 48 * MiB <= cost["merge_peak_bytes"] < 150 * MiB  # the merge's own, not the 200
    assert cost["merge_start_rss_bytes"] >= 200 * MiB
    assert cost["process_high_water_bytes"] >= cost["merge_peak_bytes"] + 200 * MiB
    assert run["peak_rss_bytes"] >= cost["merge_start_rss_bytes"] + cost["merge_peak_bytes"]
    (board,) = load_boards(tmp_path / "results.sqlite")
    assert 48 <= board.rows[0].cost["merge_rss_mib"] < 150
    assert board.rows[0].cost["peak_rss_mib"] >= 248  # the process figure, in the CSV/JSON
    del held


def test_peak_rss_counts_only_what_the_block_added():
    held = torch.ones(100 * MiB // 4)
    with PeakRSS() as rss:
        work = fresh_pages(32 * MiB)
        time.sleep(0.05)
        work.close()
    assert rss.start >= 100 * MiB
    assert 24 * MiB <= rss.own < 90 * MiB
    assert rss.high_water >= rss.peak >= rss.start + rss.own
    del held


def test_rows_stored_before_the_new_costs_show_blanks(tmp_path):
    # What every row stored before `extra["cost"]` existed looks like: same table, no entry.
    store = SQLiteStore(tmp_path / "old.sqlite")
    store.add_run(
        RunRecord(method="ties", label="ties", family="f", taskset="t",
                  config={"method": {"name": "ties"}}, scores=[TaskScore("a", "accuracy", 0.5)],
                  merge_seconds=1.3, peak_rss_bytes=2500 * MiB,
                  extra={"examples_per_second": 100.0})
    )  # fmt: skip
    reader = SQLiteStore(tmp_path / "old.sqlite", readonly=True)
    assert reader.runs()[0]["extra"] == {"examples_per_second": 100.0}
    (board,) = load_boards(tmp_path / "old.sqlite")
    cost = board.rows[0].cost
    assert cost["selection_seconds"] is None and cost["selection_candidates"] is None
    assert cost["merge_rss_mib"] is None and cost["merge_seconds"] == 1.3
    assert "| 1.3 | — | — | — |" in render([board], "markdown")
    header, line = render([board], "csv").splitlines()[:2]
    values = dict(zip(header.split(","), line.split(","), strict=True))
    assert values["selection_seconds"] == values["selection_candidates"] == ""
    assert values["merge_rss_mib"] == "" and values["peak_rss_mib"] == "2500"
