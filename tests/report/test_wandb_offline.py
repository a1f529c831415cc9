"""W&B logging runs offline and the metrics can be read back from the offline run files."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from wandb_reader import read_offline_run

from mergebench.report.boards import build_boards
from mergebench.report.records import RunRecord, TaskScore
from mergebench.report.wandb import (
    NoLogger,
    WandbLogger,
    build_logger,
    resolve_mode,
    run_metrics,
)
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError


def record(label: str, values: dict[str, float], method: str | None = None) -> RunRecord:
    return RunRecord(
        method=method or label,
        label=label,
        family="tiny",
        taskset="two",
        config={"method": {"name": method or label, "scaling": 0.3}, "seed": 0},
        scores=[TaskScore(t, "accuracy", v) for t, v in values.items()]
        + [TaskScore("a", "accuracy", 0.5, split="validation")],
        merge_seconds=2.5,
        peak_rss_bytes=1000,
        artifact_bytes=4096,
    )


def boards_for(*records: RunRecord):
    rows = [
        dict(run_id=i, method=r.method, label=r.label, family=r.family, taskset=r.taskset,
             task=s.task, metric=s.metric, value=s.value, position=p)
        for i, r in enumerate(records)
        for p, s in enumerate(r.scores)
        if s.split == "test"
    ]  # fmt: skip
    return build_boards(rows)


def test_run_metrics() -> None:
    ind = record("individual", {"a": 0.8, "b": 0.4})
    ties = record("ties", {"a": 0.6, "b": 0.3})
    m = run_metrics(ties, boards_for(ind, ties))
    assert m["test/a/accuracy"] == 0.6 and m["val/a/accuracy"] == 0.5
    assert m["test/avg"] == pytest.approx(0.45)
    assert m["test/normalized_avg"] == pytest.approx(0.75)
    assert m["rank"] == 1.0
    assert m["cost/merge_seconds"] == 2.5 and m["cost/artifact_bytes"] == 4096


def test_offline_run_files_hold_config_metrics_and_table(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be the default by itself
    ind = record("individual", {"a": 0.8, "b": 0.4})
    ties = record("ties", {"a": 0.6, "b": 0.3})
    logger = build_logger({"name": "wandb", "project": "mb-test"}, output_dir=tmp_path)
    assert isinstance(logger, WandbLogger) and logger.mode == "offline"
    logger.log_run(ties, boards_for(ind, ties), sweep_id="sweep-42")

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert run.complete and run.group == "sweep-42"
    assert run.config["method"] == {"name": "ties", "scaling": 0.3}
    assert run.config["mergebench"]["label"] == "ties"
    assert run.summary["test/a/accuracy"] == 0.6
    assert run.summary["test/avg"] == pytest.approx(0.45)
    assert run.summary["test/normalized_avg"] == pytest.approx(0.75)
    assert run.summary["cost/merge_seconds"] == 2.5
    assert any(row.get("test/b/accuracy") == 0.3 for row in run.history)

    # the leaderboard table is a file of the run: one row per (label, task) plus averages
    (table_file,) = run_dir.glob("files/media/table/leaderboard_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:3] == ["family", "taskset", "label"]
    labels_tasks = {(row[2], row[4]) for row in table["data"]}
    assert ("ties", "average") in labels_tasks and ("individual", "b") in labels_tasks


def test_logger_none_and_bad_options(tmp_path) -> None:
    assert isinstance(build_logger({"name": "none"}), NoLogger)
    assert isinstance(build_logger(None), NoLogger)
    NoLogger().log_run(record("ties", {"a": 0.5}))
    with pytest.raises(MergeBenchError, match="logger.colour"):
        build_logger({"name": "wandb", "colour": "red"})
    with pytest.raises(MergeBenchError, match="unknown logger"):
        build_logger({"name": "tensorboard"})


def test_mode_resolution(monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == "disabled"
    assert resolve_mode("offline") == "offline"
    with pytest.raises(MergeBenchError, match="logger.mode"):
        resolve_mode("sideways")


def test_logger_configs_build() -> None:
    for name in ("none", "wandb"):
        cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "logger" / f"{name}.yaml"))
        logger = build_logger(cfg)
        assert type(logger).__name__ == ("NoLogger" if name == "none" else "WandbLogger")


def test_bench_hooks_log_next_to_the_store_with_its_leaderboard(tmp_path, monkeypatch) -> None:
    from mergebench.report.store import SQLiteStore
    from mergebench.report.wandb import log_with_leaderboard, logger_from_config

    monkeypatch.delenv("WANDB_MODE", raising=False)
    db = tmp_path / "results" / "r.sqlite"
    store = SQLiteStore(db)
    ind, emr = record("individual", {"a": 0.5, "b": 0.5}), record("emr", {"a": 0.5, "b": 0.25})
    store.add_run(ind)
    store.add_run(emr)
    cfg = {"logger": {"name": "wandb"}, "store": {"path": str(db)}}
    log_with_leaderboard(logger_from_config(cfg), emr, str(db), sweep_id="s1")
    (run_dir,) = (tmp_path / "results" / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert run.group == "s1" and run.summary["test/normalized_avg"] == pytest.approx(0.75)

    log_with_leaderboard(logger_from_config({"logger": {"name": "none"}}), emr, str(db))
    assert len(list((tmp_path / "results" / "wandb").glob("offline-run-*"))) == 1
    with pytest.raises(MergeBenchError, match="logger.mode"):
        logger_from_config({"logger": {"name": "wandb", "mode": "online-ish"}})


def test_leaderboard_logs_stored_runs_without_recomputing(tmp_path, monkeypatch) -> None:
    from mergebench.cli.leaderboard import main
    from mergebench.report.store import SQLiteStore

    monkeypatch.delenv("WANDB_MODE", raising=False)
    store = SQLiteStore(tmp_path / "r.sqlite")
    store.add_run(record("individual", {"a": 0.8, "b": 0.4}))
    store.add_run(record("ties", {"a": 0.6, "b": 0.3}))
    out = tmp_path / "wb"
    assert main(["--db", str(tmp_path / "r.sqlite"), "--format", "json", "--out",
                 str(tmp_path / "b.json"), "--wandb", "--wandb-dir", str(out)]) == 0  # fmt: skip
    runs = [read_offline_run(d) for d in sorted((out / "wandb").glob("offline-run-*"))]
    assert sorted(r.config["mergebench"]["label"] for r in runs) == ["individual", "ties"]
    ties = next(r for r in runs if r.config["mergebench"]["label"] == "ties")
    assert ties.summary["test/a/accuracy"] == 0.6  # the stored score, not recomputed
