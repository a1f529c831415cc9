"""W&B in the benchmark (issue 22.9): `make bench` logs one offline run per job under
`outputs/wandb/`, a job skipped as stored logs its stored run, each stored run is logged
once under an id from its hash (`mergebench-leaderboard --wandb` twice included), and
every W&B run prints where it went. Offline only: nothing reaches the network."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_job import FakeJob, bench_cfg
from wandb_reader import read_offline_run

from mergebench.bench import job
from mergebench.cli.leaderboard import main as leaderboard
from mergebench.report.store import SQLiteStore
from mergebench.report.wandb import log_with_leaderboard, run_location, wandb_run_id

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def offline_by_default(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be the default by itself


def offline_runs(outputs: Path) -> dict[str, Path]:
    """W&B run id -> offline run folder, of every offline run under `outputs/wandb`."""
    folders = sorted((outputs / "wandb").glob("offline-run-*"))
    ids = {f.name.rsplit("-", 1)[1]: f for f in folders}
    assert len(ids) == len(folders), "one W&B run id logged twice"
    return ids


def run_bench_overrides(argv: list[str], monkeypatch, capsys) -> tuple[list[str], str]:
    """The overrides `scripts/run_bench.py` hands its multirun (nothing runs), and stderr."""
    spec = importlib.util.spec_from_file_location("run_bench", ROOT / "scripts" / "run_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls: list[list[str]] = []
    monkeypatch.setattr(module, "multirun", calls.append)
    monkeypatch.setattr(module, "write_leaderboard", lambda db, out: [])
    assert module.main(argv) == 0
    (overrides,) = calls
    return overrides, capsys.readouterr().err


def logging_job(monkeypatch) -> FakeJob:
    """`job.run` without a zoo (tests/fake_job.py), W&B logging left on."""
    fake = FakeJob(monkeypatch)
    monkeypatch.setattr(job, "log_with_leaderboard", log_with_leaderboard)
    return fake


def test_make_bench_logs_one_offline_run_per_job_under_outputs_wandb(tmp_path, monkeypatch, capsys):
    outputs = tmp_path / "outputs"
    db = outputs / "results.sqlite"
    overrides, err = run_bench_overrides(
        ["--db", str(db), "--out", str(outputs)], monkeypatch, capsys
    )
    assert "logger=wandb" in overrides  # on by default
    assert f"wandb sync {outputs / 'wandb' / 'offline-run-*'}" in err
    off, _ = run_bench_overrides(["--db", str(db), "logger=none"], monkeypatch, capsys)
    assert "logger=none" in off and "logger=wandb" not in off  # the user's choice wins
    makefile = (ROOT / "Makefile").read_text()
    assert "logger=$(LOGGER)" in makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "\nLOGGER ?= wandb\n" in makefile

    # The jobs of that multirun: each logs one W&B run next to the store, keyed by its hash.
    logging_job(monkeypatch)
    job.run(bench_cfg(outputs, "logger=wandb"))
    job.run(bench_cfg(outputs, "logger=wandb", "method.scaling=0.5"))
    printed = capsys.readouterr().err
    runs = offline_runs(outputs)
    store = SQLiteStore(db)
    by_label = {r["label"]: r for r in store.runs()}
    assert set(runs) == {wandb_run_id(r["config_hash"]) for r in by_label.values()}
    for label, row in by_label.items():
        folder = runs[wandb_run_id(row["config_hash"])]
        logged = read_offline_run(folder)
        assert logged.complete and logged.config["mergebench"]["label"] == label
        assert logged.config["mergebench"]["run_hash"] == row["config_hash"]
        # the line saying where it went: the folder, and how to upload it
        assert f"W&B: {label} | " in printed and f"-> {folder} (offline; " in printed
        assert f"wandb sync {folder}" in printed

    # The leaderboard finds the jobs' runs: nothing is logged twice.
    assert leaderboard(["--db", str(db), "--wandb", "--wandb-dir", str(outputs)]) == 0
    assert "logged 0 stored runs" in capsys.readouterr().err
    assert offline_runs(outputs).keys() == runs.keys()


def test_logger_wandb_on_a_stored_run_logs_the_stored_run_once(tmp_path, monkeypatch, capsys):
    fake = logging_job(monkeypatch)
    job.run(bench_cfg(tmp_path))  # logger=none: stored, nothing logged
    assert not (tmp_path / "wandb").exists()
    (row,) = SQLiteStore(tmp_path / "results.sqlite").runs()

    assert job.run(bench_cfg(tmp_path, "logger=wandb"))["skipped"] is True
    assert len(fake.merges) == 1  # not run again: the stored run is what is logged
    (run_id,) = offline_runs(tmp_path)
    assert run_id == wandb_run_id(row["config_hash"])
    logged = read_offline_run(offline_runs(tmp_path)[run_id])
    assert logged.summary["test/a/accuracy"] == pytest.approx(0.6)  # the stored score
    assert logged.config["zoo_signature"] == "zoo-1"
    assert "W&B: task_arithmetic | " in capsys.readouterr().err

    # Again: logged before under its hash, so it says where and logs nothing.
    assert job.run(bench_cfg(tmp_path, "logger=wandb"))["skipped"] is True
    err = capsys.readouterr().err
    assert f"already logged offline in {offline_runs(tmp_path)[run_id]}" in err
    assert list(offline_runs(tmp_path)) == [run_id]


def test_leaderboard_wandb_twice_logs_each_stored_run_once(tmp_path, capsys):
    from test_wandb_offline import record

    db = tmp_path / "r.sqlite"
    store = SQLiteStore(db)
    store.add_run(record("individual", {"a": 0.8, "b": 0.4}))
    store.add_run(record("ties", {"a": 0.6, "b": 0.3}))
    hashes = {r["config_hash"] for r in store.runs()}
    argv = ["--db", str(db), "--format", "json", "--out", str(tmp_path / "b.json"), "--wandb",
            "--wandb-dir", str(tmp_path / "wb")]  # fmt: skip
    assert leaderboard(argv) == 0
    assert "logged 2 stored runs to W&B" in capsys.readouterr().err
    first = offline_runs(tmp_path / "wb")
    assert set(first) == {wandb_run_id(h) for h in hashes}

    assert leaderboard(argv) == 0
    err = capsys.readouterr().err
    assert "logged 0 stored runs to W&B" in err and "2 logged before" in err
    assert err.count("already logged offline in") == 2
    assert offline_runs(tmp_path / "wb") == first  # no second folder, same ids


def test_the_printed_location_online_offline_and_disabled():
    online = SimpleNamespace(
        settings=SimpleNamespace(mode="online"), offline=False, url="https://wandb.ai/me/p/runs/x"
    )
    assert run_location(online) == "https://wandb.ai/me/p/runs/x"
    offline = SimpleNamespace(
        settings=SimpleNamespace(mode="offline", sync_dir="out/wandb/offline-run-1-x"),
        offline=True,
    )
    assert run_location(offline) == (
        "out/wandb/offline-run-1-x (offline; upload: wandb sync out/wandb/offline-run-1-x)"
    )
    disabled = SimpleNamespace(settings=SimpleNamespace(mode="disabled"), offline=False)
    assert "disabled" in run_location(disabled)
