"""`mergebench-eval`: a saved merge (mergebench's, or another tool's folder) scored on the
family's tasks and stored as a row of the benchmark's board. On the tiny BERT world of
`tests/families/test_own_models.py` (`model=hf_sequence_classification taskset=local`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tiny_hf
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from mergebench.cli.evaluate import main as eval_main
from mergebench.cli.merge import main as merge_main
from mergebench.report.store import SQLiteStore
from mergebench.results import load_result
from mergebench.util.config import conf_dir

TASKS = ("sentiment", "topic")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tiny_hf.make_own_world(tmp_path_factory.mktemp("own"))


@pytest.fixture(autouse=True)
def bench_cache(world, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(world / "bench_cache"))


def family_overrides(root: Path, db: Path) -> list[str]:
    data = (
        f"taskset.data={{sentiment: {{train: {root}/data/sentiment_train.csv, "
        f"test: {root}/data/sentiment_test.csv, inputs: [text], label: label}}, "
        f"topic: {{train: {root}/data/topic_train.jsonl, test: {root}/data/topic_test.jsonl, "
        "inputs: [text], metric: macro_f1}}"
    )
    return [
        "model=hf_sequence_classification",
        f"model.checkpoints.pretrained={root / 'base'}",
        f"model.checkpoints.finetuned={{sentiment: {root / 'sentiment'}, topic: {root / 'topic'}}}",
        "taskset=local",
        data,
        f"taskset.cache_dir={root / 'datasets_cache'}",
        f"store.path={db}",
        "references=false",
        "progress=false",
    ]


def run(main, argv: list[str], cwd: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    """A console script's `main` in this process: (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", argv)
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def merge_cli(world: Path, out: Path, method: str, tmp_path, capsys, monkeypatch, *extra) -> Path:
    tasks = ", ".join(f"{t}: {world / t}" for t in extra or TASKS)
    argv = ["mergebench-merge", f"method={method}", f"pretrained={world / 'base'}",
            f"finetuned={{{tasks}}}", r"exclude=[classifier\..*]", f"output_dir={out}",
            "progress=false"]  # fmt: skip
    code, _, err = run(merge_main, argv, tmp_path, capsys, monkeypatch)
    assert code == 0, err
    return out


def eval_cli(world, db, tmp_path, capsys, monkeypatch, *args) -> tuple[int, str, str]:
    argv = ["mergebench-eval", *args, *family_overrides(world, db)]
    return run(eval_main, argv, tmp_path, capsys, monkeypatch)


def rows(db: Path) -> list[dict]:
    return SQLiteStore(db).runs() if db.exists() else []


def scores(db: Path, run: dict) -> dict[str, float]:
    """The stored test scores of one run."""
    stored = SQLiteStore(db).scores()
    return {s["task"]: s["value"] for s in stored if s["run_id"] == run["run_id"]}


def test_a_saved_ties_result_scores_as_the_bench_row(world, tmp_path, capsys, monkeypatch):
    from mergebench.bench import job

    db = tmp_path / "results.sqlite"
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=[*family_overrides(world, db), "method=ties",
                                           "protocol.select=false"])  # fmt: skip
    bench = {s["task"]: s["value"] for s in job.run(cfg)["scores"]}
    saved = merge_cli(world, tmp_path / "ties", "ties", tmp_path, capsys, monkeypatch)
    code, out, err = eval_cli(world, db, tmp_path, capsys, monkeypatch, str(saved))
    assert code == 0, err
    assert f"ties: stored in {db}" in out
    runs = rows(db)
    assert [r["label"] for r in runs] == ["ties", "ties"]  # the bench's row, then the saved one
    evaluated = runs[-1]
    assert evaluated["config"]["evaluated"]["method"] == "ties"
    assert evaluated["config_hash"] != runs[0]["config_hash"]
    assert scores(db, evaluated) == bench
    assert set(bench) == set(TASKS)


def test_an_emr_result_is_scored_per_task_with_its_own_weights(
    world, tmp_path, capsys, monkeypatch
):
    from mergebench.evaluation import ModelCache, score_model
    from mergebench.sources import load_family

    # EMR keeps its pretrained model by reference: saved under the family's key names.
    base = load_result_base(world, tmp_path)
    db = tmp_path / "results.sqlite"
    argv = ["mergebench-merge", "method=emr", f"pretrained={base}",
            f"finetuned={{sentiment: {world / 'sentiment'}, topic: {world / 'topic'}}}",
            r"exclude=[classifier\..*]", f"output_dir={tmp_path / 'emr'}", "progress=false"]  # fmt: skip
    code, _, err = run(merge_main, argv, tmp_path, capsys, monkeypatch)
    assert code == 0, err
    code, out, err = eval_cli(world, db, tmp_path, capsys, monkeypatch, str(tmp_path / "emr"))
    assert code == 0, err
    (stored,) = rows(db)
    assert stored["method"] == "emr" and stored["label"] == "emr"
    got = scores(db, stored)
    # Each task through its own weights (W_pre + lam_t * M_t * tau_uni), loaded plainly.
    result = load_result(tmp_path / "emr")
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=family_overrides(world, db))
    _, data = load_family(cfg.model, cfg.taskset)
    cache = ModelCache(data)
    for task in TASKS:
        model = cache.model_for(task, result.state_dict(task))
        expected, _ = score_model(model, data, task, "test", 8)
        assert got[task] == pytest.approx(expected.value, abs=1e-9)
    own = result.state_dict("sentiment")["bert.encoder.layer.0.attention.self.query.weight"]
    other = result.state_dict("topic")["bert.encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(own, other)  # the two tasks ran different weights


def load_result_base(world: Path, tmp_path: Path) -> Path:
    """The world's bare base under the classifier's names (`bert.*`), as one safetensors."""
    from mergebench.engine.checkpoints import open_checkpoint

    base = open_checkpoint(world / "base")
    path = tmp_path / "base_named.safetensors"
    save_file({f"bert.{k}": base.get(k).contiguous() for k in base.keys()}, path)
    return path


def test_a_foreign_folder_is_an_external_row_stored_once(world, tmp_path, capsys, monkeypatch):
    from transformers import AutoConfig, BertForSequenceClassification

    db = tmp_path / "results.sqlite"
    ties = merge_cli(world, tmp_path / "ties", "ties", tmp_path, capsys, monkeypatch)
    code, _, err = eval_cli(world, db, tmp_path, capsys, monkeypatch, str(ties))
    assert code == 0, err
    ties_scores = scores(db, rows(db)[0])
    # Another tool's output: the merged backbone in a classifier's save_pretrained folder
    # (its own head is not the tasks': each task's head comes from its fine-tune).
    merged = load_result(ties).state_dict()
    model = BertForSequenceClassification(AutoConfig.from_pretrained(world / "topic"))
    model.bert.load_state_dict(merged)
    folder = tmp_path / "my-merge"
    model.save_pretrained(folder)
    for _ in range(2):
        code, out, err = eval_cli(world, db, tmp_path, capsys, monkeypatch, str(folder))
        assert code == 0, err
    assert "external (my-merge) on hf_sequence_classification/local: already in" in err
    external = [r for r in rows(db) if r["method"] == "external"]
    assert [r["label"] for r in external] == ["external (my-merge)"]
    assert scores(db, external[0]) == ties_scores
    # One safetensors file under the bare model's names (aligned by the detected prefix),
    # named on the command line: a new row with the same scores.
    save_file(merged, tmp_path / "bare.safetensors")
    code, _, err = eval_cli(world, db, tmp_path, capsys, monkeypatch,
                            str(tmp_path / "bare.safetensors"), "--name", "bare")  # fmt: skip
    assert code == 0, err
    (bare,) = [r for r in rows(db) if r["label"] == "external (bare)"]
    assert scores(db, bare) == ties_scores


def test_bad_inputs_are_one_line_and_store_nothing(world, tmp_path, capsys, monkeypatch):
    db = tmp_path / "results.sqlite"
    merged = load_result(
        merge_cli(world, tmp_path / "ties", "ties", tmp_path, capsys, monkeypatch)
    ).state_dict()
    key = "encoder.layer.1.output.dense.weight"
    wrong = {**merged, key: torch.zeros(3, 5)}
    save_file(wrong, tmp_path / "wrong.safetensors")
    (tmp_path / "empty").mkdir()
    merge_cli(world, tmp_path / "emr_one", "emr", tmp_path, capsys, monkeypatch, "sentiment")
    cases = {
        str(tmp_path / "nowhere"): "nowhere: not found",
        str(tmp_path / "wrong.safetensors"): (
            f"tensor 'bert.{key}' has shape [3, 5], the family's model [32, 64]"
        ),
        str(tmp_path / "empty"): "no checkpoint found in folder",
        str(tmp_path / "emr_one"): "without task 'topic' of the task set",
    }
    for path, expected in cases.items():
        code, out, err = eval_cli(world, db, tmp_path, capsys, monkeypatch, path)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith("mergebench-eval: error: ") and expected in lines[0], err
    code, _, err = eval_cli(world, db, tmp_path, capsys, monkeypatch, str(tmp_path / "ties"),
                            "--name", "x")  # fmt: skip
    assert code == 2 and "name: " in err and "is a mergebench result" in err
    code, _, err = eval_cli(world, db, tmp_path, capsys, monkeypatch)
    assert code == 2 and "RESULT_DIR: missing" in err
    code, _, err = eval_cli(world, db, tmp_path, capsys, monkeypatch, "x", "method=ties")
    assert code == 2 and "method: not a setting of mergebench-eval" in err
    assert rows(db) == []


def test_a_missing_folder_is_refused_before_the_family_is_opened(
    world, tmp_path, capsys, monkeypatch
):
    """A zoo may need training before the family's checkpoints open: no reason to wait for
    that to learn that RESULT_DIR is a typo."""
    from mergebench.bench import evaluate_saved

    def opened(*args):
        raise AssertionError("the family was opened")

    monkeypatch.setattr(evaluate_saved, "_context", opened)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("no weights here")
    for path, expected in ((tmp_path / "typo", "typo: not found"),
                           (tmp_path / "notes", "no checkpoint found in folder")):  # fmt: skip
        code, _, err = eval_cli(world, tmp_path / "db.sqlite", tmp_path, capsys, monkeypatch,
                                str(path))  # fmt: skip
        assert code == 2 and expected in err, err
