"""The whole offline pipeline on a tiny zoo built inside the test: packaged MiniLM, two real
text tasks, a few dozen examples, 16-token sequences, one short epoch. Zoo CLI (cache,
metadata, reuse, determinism) -> Hydra multirun of `mergebench` -> results store ->
leaderboard files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mergebench.cli import zoo as zoo_cli
from mergebench.evaluation import score_model
from mergebench.sources import zoo
from mergebench.util.config import compose_config

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["rt_sentiment", "bbc_news"]


def tiny(zoo_dir: Path) -> list[str]:
    return [
        f"zoo.dir={zoo_dir}",
        f"taskset.tasks=[{','.join(TASKS)}]",
        "taskset.examples.train=24",
        "taskset.examples.validation=8",
        "taskset.examples.test=16",
        "model.options.max_length=16",
        "model.finetune.epochs=1",
        "model.finetune.multitask_epochs=1",
        "model.finetune.batch_size=8",
    ]


def run_bench_module():
    spec = importlib.util.spec_from_file_location("run_bench", ROOT / "scripts" / "run_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("zoo")
    assert zoo_cli.main(["--set", "text", "--no-progress", *tiny(cache)]) == 0
    return cache / "minilm"


def test_zoo_saves_checkpoints_with_metadata(tiny_zoo):
    manifest = json.loads((tiny_zoo / "zoo.json").read_text())
    pretrained = load_file(str(tiny_zoo / "pretrained.safetensors"))
    assert not any(k.startswith("classifier.") for k in pretrained)
    for task, classes in zip(TASKS, (2, 5), strict=True):
        entry = manifest["tasks"][task]
        assert entry["examples"] == {"train": 24, "validation": 8, "test": 16}
        assert len(entry["data_fingerprint"]) == 64 and entry["seed"] == 0
        assert entry["finetune"]["epochs"] == 1 and entry["options"]["max_length"] == 16
        assert 0.0 <= entry["metrics"]["validation"]["accuracy"] <= 1.0
        assert "test" not in entry["metrics"]  # scored once, by the reference rows
        state = load_file(str(tiny_zoo / entry["file"]))
        assert state["classifier.weight"].shape[0] == classes
        assert set(state) - set(pretrained) == {"classifier.weight", "classifier.bias"}
        # Fine-tuning moved the encoder (a task vector is not zero).
        key = "encoder.encoder.layer.0.attention.self.query.weight"
        assert not state[key].equal(pretrained[key])
    multitask = manifest["multitask"]["text"]
    assert multitask["tasks"] == TASKS
    assert (tiny_zoo / "multitask" / "text" / "backbone.safetensors").exists()
    for task in TASKS:
        assert (tiny_zoo / "multitask" / "text" / "heads" / f"{task}.safetensors").exists()
    # The zoo CLI evaluated the reference rows once, for the benchmark to reuse.
    cached = json.loads((tiny_zoo / "references" / "text.json").read_text())
    assert cached["split"] == "test" and cached["tasks"] == TASKS
    assert set(cached["rows"]) == {"individual", "multitask", "pretrained"}


def test_zoo_is_cached_and_deterministic(tiny_zoo, tmp_path):
    stamp = (tiny_zoo / f"{TASKS[0]}.safetensors").stat().st_mtime_ns
    cfg = compose_config(["taskset=text", *tiny(tiny_zoo.parent)])
    zoo.ensure_zoo(cfg, progress=False)
    assert (tiny_zoo / f"{TASKS[0]}.safetensors").stat().st_mtime_ns == stamp, "reused"
    # Same seed and settings in a fresh cache: bit-identical fine-tuned weights.
    other = tmp_path / "again"
    overrides = [*tiny(other), f"taskset.tasks=[{TASKS[0]}]"]
    assert zoo_cli.main(["--set", "text", "--no-progress", "--no-multitask", *overrides]) == 0
    a = load_file(str(tiny_zoo / f"{TASKS[0]}.safetensors"))
    b = load_file(str(other / "minilm" / f"{TASKS[0]}.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_bench_sweep_stores_runs_and_writes_leaderboard(tiny_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # Hydra's multirun folders land here
    db, out = tmp_path / "results.sqlite", tmp_path / "out"
    bench = run_bench_module()
    argv = [*tiny(tiny_zoo.parent), "--sets", "text", "--db", str(db), "--out", str(out)]
    assert bench.main([*argv, "--variants", "emr", "task_arithmetic"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "individual" in printed and "emr" in printed
    # make bench's default logger: one offline W&B run per job beside the database
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
    assert f"W&B: emr | minilm/text -> {tmp_path / 'wandb'}" in captured.err

    board = json.loads((out / "leaderboard.json").read_text())["boards"]
    assert len(board) == 1 and board[0]["tasks"] == TASKS
    rows = {r["label"]: r for r in board[0]["rows"]}
    assert set(rows) == {"individual", "multitask", "pretrained", "emr", "task_arithmetic"}
    assert "emr" in (out / "leaderboard.md").read_text()

    # The individual row (cached by the zoo CLI) is what scoring each fine-tuned model on
    # its test split gives now.
    cfg = compose_config(["taskset=text", *tiny(tiny_zoo.parent), "zoo.build_missing=false"])
    source = zoo.ZooSource(cfg, progress=False)
    for task in TASKS:
        model = source.data.family.build_model(task)
        model.load_state_dict(load_file(str(tiny_zoo / f"{task}.safetensors")))
        score, _ = score_model(model, source.data, task, "test", 8)
        assert rows["individual"]["scores"][task] == pytest.approx(score.value)
    assert rows["individual"]["normalized_average"] == pytest.approx(1.0)

    from mergebench.report.store import SQLiteStore

    runs = {r["label"]: r for r in SQLiteStore(db).runs()}
    assert runs["emr"]["merge_seconds"] > 0 and runs["emr"]["artifact_bytes"] > 0
    assert runs["emr"]["peak_rss_bytes"] > 0 and runs["emr"]["extra"]["examples_per_second"] > 0
    assert runs["emr"]["config"]["method"]["name"] == "emr"
    # References are cached per zoo; a rerun of a stored config is skipped (resume).
    assert (tiny_zoo / "references" / "text.json").exists()
    assert bench.main([*argv, "--variants", "emr"]) == 0
    err = capsys.readouterr().err
    assert "already in" in err and "W&B: emr | minilm/text already logged offline" in err
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
    assert len(SQLiteStore(db).runs()) == len(runs)
