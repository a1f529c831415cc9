"""One's own models and data: `model=hf_sequence_classification` (fine-tunes of one base,
classes from each checkpoint's config) on `taskset=local` (CSV / JSON lines / Parquet /
save_to_disk files per split), on tiny BERTs and files made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_hf
import torch
from hydra import compose, initialize_config_dir

from mergebench.data.hf import split_rows
from mergebench.evaluation import evaluate
from mergebench.sources import load_family, load_pool
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError

TASKS = ("sentiment", "topic")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tiny_hf.make_own_world(tmp_path_factory.mktemp("own"))


def data_override(root: Path, **changes: dict) -> str:
    data = {
        "sentiment": {
            "train": f"{root}/data/sentiment_train.csv",
            "test": f"{root}/data/sentiment_test.csv",
            "inputs": "[text]",
            "label": "label",
        },
        "topic": {
            "train": f"{root}/data/topic_train.jsonl",
            "test": f"{root}/data/topic_test.jsonl",
            "inputs": "[text]",
            "metric": "macro_f1",
        },
    }
    for task, change in changes.items():
        data[task].update(change)
    body = ", ".join(
        f"{task}: {{{', '.join(f'{k}: {v}' for k, v in spec.items())}}}"
        for task, spec in data.items()
    )
    return f"taskset.data={{{body}}}"


def own_config(root: Path, *extra: str, **changes: dict):
    overrides = [
        "model=hf_sequence_classification",
        f"model.checkpoints.pretrained={root / 'base'}",
        f"model.checkpoints.finetuned={{sentiment: {root / 'sentiment'}, topic: {root / 'topic'}}}",
        "taskset=local",
        data_override(root, **changes),
        f"taskset.cache_dir={root / 'datasets_cache'}",
        *extra,
    ]
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=overrides)


def test_tasks_splits_and_classes_from_checkpoints(world):
    cfg = own_config(world, "taskset.examples.validation=5")
    assert list(cfg.taskset.tasks) == list(TASKS)  # the tasks of taskset.data, in order
    family, data = load_family(cfg.model, cfg.taskset)
    # sentiment: string labels mapped by the checkpoint's id2label, not the data's order
    assert data.spec("sentiment").classes == ("negative", "positive")
    assert family.tasks["topic"].num_classes == 3
    labels = data.labels("sentiment", "test")
    expected = [0 if i % 2 == 0 else 1 for i in range(12)]  # negative, positive, ...
    assert labels.tolist() == expected
    # train shuffled, validation carved out of train (5 rows), test the whole test file
    spec = data.spec("topic")
    train_source, train_rows = split_rows(spec, "train", 0, data._examples)
    val_source, val_rows = split_rows(spec, "validation", 0, data._examples)
    assert train_source == val_source == "train" and len(val_rows) == 5
    assert not set(train_rows) & set(val_rows) and len(train_rows) == 25
    assert data.num_examples("topic", "test") == 9
    assert data.metric_name("topic") == "macro_f1"
    # the family holds inputs only: the label column is not among what it opens
    rows = family.tasks["sentiment"].inputs["train"]
    assert all(isinstance(t, str) for t in rows[:4])
    rows._open()
    assert rows._data.column_names == ["text"]
    batch = next(family.unlabeled_inputs("topic", "train", 4, 4))
    assert set(batch) == {"input_ids", "attention_mask"}


def test_individual_row_is_transformers_own_classifier(world):
    """The base is a bare BertModel (`embeddings.*`), the fine-tunes `bert.*` + `classifier.*`:
    the pool reads both under the classifier's names, and heads are never merged."""
    import transformers

    cfg = own_config(world)
    pool, data = load_pool(cfg.model, cfg.taskset, seed=0)
    assert "bert.embeddings.word_embeddings.weight" in pool.pretrained
    assert data.family.head_patterns == (r"classifier\..*",)
    assert pool.finetuned["topic"].shape("classifier.weight")[0] == 3

    class Individual:
        def state_dict(self, task):
            return pool.finetuned[task].state_dict()

    scores = {s.task: s.value for s in evaluate(Individual(), data)}
    for task in TASKS:
        reference = transformers.AutoModelForSequenceClassification.from_pretrained(
            world / task
        ).eval()
        logits, labels = [], []
        for batch, y in data.batches(task, "test", batch_size=4):
            with torch.no_grad():
                logits.append(reference(**batch).logits)
            labels.append(y)
        pred, y = torch.cat(logits).argmax(1), torch.cat(labels)
        if task == "sentiment":
            assert scores[task] == pytest.approx(float((pred == y).float().mean()), abs=1e-6)
        else:
            from sklearn.metrics import f1_score

            f1 = f1_score(y, pred, average="macro", labels=[0, 1, 2], zero_division=0)
            assert scores[task] == pytest.approx(f1, abs=1e-5)


def test_parquet_and_save_to_disk_files(world, tmp_path):
    import datasets

    train = datasets.Dataset.from_json(str(world / "data/topic_train.jsonl"))
    train.to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_json(str(world / "data/topic_test.jsonl")).save_to_disk(
        str(tmp_path / "test_saved")
    )
    cfg = own_config(
        world,
        topic={"train": tmp_path / "train.parquet", "test": tmp_path / "test_saved"},
    )
    _, data = load_family(cfg.model, cfg.taskset)
    assert data.labels("topic", "test").tolist() == [2, 1, 0] * 3


def bad(world, tmp_path, *extra, **changes) -> str:
    cfg = own_config(world, *extra, **changes)
    with pytest.raises(MergeBenchError) as err:
        _, data = load_family(cfg.model, cfg.taskset)
        for task in data.tasks:
            data.labels(task, "test")
            data.family.tasks[task].inputs["test"][:1]
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_naming_the_key(world, tmp_path):
    assert bad(world, tmp_path, topic={"inputs": "[sentence]"}).startswith(
        "taskset.data.topic.inputs: "
    )
    assert "no column 'sentence'" in bad(world, tmp_path, topic={"inputs": "[sentence]"})
    assert bad(world, tmp_path, sentiment={"label": "stars"}).startswith(
        "taskset.data.sentiment.label: "
    )
    (tmp_path / "train.txt").write_text("text,label\n")
    message = bad(world, tmp_path, topic={"train": tmp_path / "train.txt"})
    assert message.startswith("taskset.data.topic.train: ") and "not a data file" in message
    (tmp_path / "empty.csv").write_text("text,label\n")
    message = bad(world, tmp_path, topic={"test": tmp_path / "empty.csv"})
    assert message.startswith("taskset.data.topic.test: ") and "empty.csv" in message
    assert bad(world, tmp_path, topic={"test": tmp_path / "nope.csv"}).endswith("not found")
    # a label in test that train lacks
    rows = tiny_hf.own_rows(6, 5, ["negative", "positive", "neutral"])
    tiny_hf.write_csv(tmp_path / "unseen.csv", rows)
    message = bad(world, tmp_path, sentiment={"test": tmp_path / "unseen.csv"})
    assert message.startswith("taskset.data.sentiment.test: ")
    assert "'neutral'" in message and "sentiment_train.csv" in message
    # the data's labels are not the checkpoint's
    tiny_hf.write_csv(tmp_path / "other.csv", tiny_hf.own_rows(6, 5, ["good", "bad"]))
    message = bad(
        world, tmp_path, sentiment={"train": tmp_path / "other.csv", "test": tmp_path / "other.csv"}
    )
    assert message.startswith("model.checkpoints.finetuned.sentiment: label 'bad'")
    # class ids past the checkpoint's head
    tiny_hf.write_jsonl(tmp_path / "ids.jsonl", tiny_hf.own_rows(8, 5, [0, 1, 2, 3]))
    message = bad(
        world, tmp_path, topic={"train": tmp_path / "ids.jsonl", "test": tmp_path / "ids.jsonl"}
    )
    assert message.startswith("model.checkpoints.finetuned.topic: 3 labels")
    # files and a hub id at once
    message = bad(world, tmp_path, topic={"path": "nyu-mll/glue"})
    assert message.startswith("taskset.data.topic.path: not with files")
    assert bad(world, tmp_path, topic={"test": "null"}).startswith(
        "taskset.data.topic.test: missing"
    )


def test_bench_run_lands_a_row_beside_the_references(world, monkeypatch):
    """What `mergebench model=hf_sequence_classification ... taskset=local method=ties` runs."""
    from mergebench.bench import job as bench
    from mergebench.report.boards import load_boards

    monkeypatch.setenv("MERGEBENCH_CACHE", str(world / "bench_cache"))
    db = world / "results.sqlite"
    cfg = own_config(world, "method=ties", f"store.path={db}", "progress=false")
    summary = bench.run(cfg)
    assert [(s["task"], s["metric"]) for s in summary["scores"]] == [
        ("sentiment", "accuracy"), ("topic", "macro_f1")
    ]  # fmt: skip
    (board,) = load_boards([str(db)])
    rows = {r.label: r for r in board.rows}
    assert {"individual", "pretrained", "ties"} <= set(rows)
    ties = rows["ties"]
    assert np.isfinite(ties.average) and ties.average_ci is not None
    assert set(ties.scores_ci) == set(TASKS)
