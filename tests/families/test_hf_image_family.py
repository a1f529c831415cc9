"""One's own image classifiers: `model=hf_image_classification` (fine-tunes of one base by
transformers' `AutoModelForImageClassification` or timm, classes from each fine-tune's config)
on `taskset=local` image data (class folders, Parquet, save_to_disk), on tiny ViTs made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_images
import torch
from hydra import compose, initialize_config_dir

from mergebench.evaluation import evaluate
from mergebench.sources import load_family, load_pool
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError

TASKS = ("colour", "shade")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tiny_images.make_image_world(tmp_path_factory.mktemp("images"))


def data_override(root: Path, **changes: dict) -> str:
    data = {
        "colour": {
            "train": f"{root}/data/colour_train",
            "test": f"{root}/data/colour_test",
            "inputs": "[image]",
        },
        "shade": {
            "train": f"{root}/data/shade_train.parquet",
            "test": f"{root}/data/shade_test",
            "inputs": "[image]",
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


def image_config(root: Path, *extra: str, models: dict[str, str] | None = None, **changes):
    names = {"base": "base", "colour": "colour", "shade": "shade", **(models or {})}
    overrides = [
        "model=hf_image_classification",
        f"model.checkpoints.pretrained={root / names['base']}",
        "model.checkpoints.finetuned="
        f"{{colour: {root / names['colour']}, shade: {root / names['shade']}}}",
        "taskset=local",
        "taskset.family=image",
        data_override(root, **changes),
        f"taskset.cache_dir={root / 'datasets_cache'}",
        *extra,
    ]
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=overrides)


class Individual:
    def __init__(self, pool) -> None:
        self.pool = pool

    def state_dict(self, task):
        return self.pool.finetuned[task].state_dict()


def reference_scores(data, predict) -> dict[str, float]:
    """Accuracy (colour) and macro F1 (shade) of `predict(task, batch) -> logits`."""
    from sklearn.metrics import f1_score

    scores = {}
    for task in TASKS:
        logits, labels = [], []
        for batch, y in data.batches(task, "test", batch_size=4):
            with torch.no_grad():
                logits.append(predict(task, batch))
            labels.append(y)
        pred, y = torch.cat(logits).argmax(1), torch.cat(labels)
        if task == "colour":
            scores[task] = float((pred == y).float().mean())
        else:
            scores[task] = f1_score(y, pred, average="macro", labels=[0, 1], zero_division=0)
    return scores


def test_classes_labels_and_individual_rows_are_transformers_own(world):
    """Class folders' names map through the fine-tune's id2label; the pool reads transformers'
    saved names under the model's; `individual` scores are the fine-tunes' own."""
    import transformers

    cfg = image_config(world)
    pool, data = load_pool(cfg.model, cfg.taskset, seed=0)
    family = data.family
    assert family.head_patterns == (r"classifier\..*",)
    assert data.spec("colour").classes == ("red", "green", "blue")
    assert family.tasks["shade"].num_classes == 2
    assert pool.finetuned["colour"].shape("classifier.weight")[0] == 3
    # class folders blue/green/red, three images each: ids follow id2label, not the folders
    assert data.labels("colour", "test").tolist() == [2, 2, 2, 1, 1, 1, 0, 0, 0]
    assert data.labels("shade", "test").tolist() == [1, 0] * 4
    # the family opens the image column only
    rows = family.tasks["colour"].inputs["train"]
    rows._open()
    assert rows._data.column_names == ["image"]
    batch = next(family.unlabeled_inputs("shade", "train", 4, 4))
    assert tuple(batch["pixel_values"].shape) == (4, 3, 32, 32)

    scores = {s.task: s.value for s in evaluate(Individual(pool), data)}
    models = {
        t: transformers.AutoModelForImageClassification.from_pretrained(world / t).eval()
        for t in TASKS
    }
    expected = reference_scores(data, lambda t, b: models[t](**b).logits)
    for task in TASKS:
        assert scores[task] == pytest.approx(expected[task], abs=1e-6)


def test_bench_run_lands_a_row_beside_the_references(world, monkeypatch):
    """What `mergebench model=hf_image_classification ... taskset=local method=ties` runs."""
    from mergebench.bench import job as bench
    from mergebench.report.boards import load_boards

    monkeypatch.setenv("MERGEBENCH_CACHE", str(world / "bench_cache"))
    db = world / "results.sqlite"
    cfg = image_config(world, "method=ties", f"store.path={db}", "progress=false")
    summary = bench.run(cfg)
    assert [(s["task"], s["metric"]) for s in summary["scores"]] == [
        ("colour", "accuracy"), ("shade", "macro_f1")
    ]  # fmt: skip
    (board,) = load_boards([str(db)])
    rows = {r.label: r for r in board.rows}
    assert {"individual", "pretrained", "ties"} <= set(rows)
    ties = rows["ties"]
    assert np.isfinite(ties.average) and ties.average_ci is not None
    assert set(ties.scores_ci) == set(TASKS)


def test_bare_backbone_base_with_prefixed_finetunes(world):
    """A base saved as `ViTModel` (`embeddings.*`, a pooler) and fine-tunes as
    `ViTForImageClassification` (`vit.*`, `classifier.*`): the base reads under `vit.`."""
    from safetensors import safe_open

    base = tiny_images.make_vit_base(world / "bare", bare=True)
    tiny_images.make_vit_finetuned(base, world / "bare_colour", tiny_images.COLOURS, seed=1)
    tiny_images.make_vit_finetuned(base, world / "bare_shade", 2, seed=2)
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("vit.") for k in f.keys())
    cfg = image_config(
        world, models={"base": "bare", "colour": "bare_colour", "shade": "bare_shade"}
    )
    pool, data = load_pool(cfg.model, cfg.taskset, seed=0)
    keys = pool.pretrained.keys()
    assert keys and all(k.startswith("vit.") for k in keys)
    assert not any("pooler" in k for k in keys)
    # the `pretrained` reference: the base's backbone with each task's head scores
    import transformers

    bare = transformers.ViTModel.from_pretrained(base, add_pooling_layer=False).state_dict()
    mine = pool.pretrained.state_dict()
    assert {"vit." + k for k in bare} == set(mine)
    assert all(torch.equal(mine["vit." + k], v) for k, v in bare.items())
    assert len(list(evaluate(Individual(pool), data))) == 2


def test_timm_checkpoints(world):
    """timm folders (`config.json` + `model.safetensors`, as save_for_hf/push_to_hf_hub write
    them): classes from num_classes/label_names, heads `head.*`, scores timm's own."""
    import timm

    base = tiny_images.make_timm(world / "timm_base", num_classes=0)
    tiny_images.make_timm(world / "timm_colour", 3, tiny_images.COLOURS, seed=1, base=base)
    tiny_images.make_timm(world / "timm_shade", 2, seed=2, base=base)
    cfg = image_config(
        world, models={"base": "timm_base", "colour": "timm_colour", "shade": "timm_shade"}
    )
    pool, data = load_pool(cfg.model, cfg.taskset, seed=0)
    assert data.family.head_patterns == (r"head\..*",)
    assert data.spec("colour").classes == ("red", "green", "blue")
    assert not any(k.startswith("head.") for k in pool.pretrained.keys())
    scores = {s.task: s.value for s in evaluate(Individual(pool), data)}
    models = {
        t: timm.create_model(f"local-dir:{world / f'timm_{t}'}", pretrained=True).eval()
        for t in TASKS
    }
    expected = reference_scores(data, lambda t, b: models[t](b["pixel_values"]))
    for task in TASKS:
        assert scores[task] == pytest.approx(expected[task], abs=1e-6)


def bad(world, *extra, models=None, pool=False, **changes) -> str:
    cfg = image_config(world, *extra, models=models, **changes)
    with pytest.raises(MergeBenchError) as err:
        if pool:
            load_pool(cfg.model, cfg.taskset, seed=0)
        _, data = load_family(cfg.model, cfg.taskset)
        for task in data.tasks:
            data.labels(task, "test")
            data.family.encode(data.family.tasks[task].inputs["test"][:1])
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line(world, tmp_path):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    # a fine-tune of another architecture
    other = tmp_path / "convnext"
    ConvNextForImageClassification(
        ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    ).save_pretrained(other)
    message = bad(world, models={"shade": str(other)})
    assert message.startswith("model.checkpoints.finetuned.shade: ")
    assert "transformers convnext" in message and "transformers vit" in message
    # a fine-tune of another size: shapes differ
    wide = tiny_images.make_vit_base(tmp_path / "wide", hidden_size=16)
    tiny_images.make_vit_finetuned(wide, tmp_path / "wide_shade", 2, seed=3)
    message = bad(world, models={"shade": str(tmp_path / "wide_shade")}, pool=True)
    assert message.startswith("model.checkpoints.finetuned.shade: ") and "shape" in message
    # a base without an image processor
    (tmp_path / "no_processor").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "no_processor" / name).write_bytes((world / "base" / name).read_bytes())
    message = bad(world, models={"base": str(tmp_path / "no_processor")})
    assert message.startswith("model.checkpoints.pretrained: cannot load the image processor")
    # the image column missing, a text column instead of images
    message = bad(world, shade={"inputs": "[picture]"})
    assert message.startswith("taskset.data.shade.inputs: ") and "'picture'" in message
    tiny_images.image_table([0, 1], seed=0).map(
        lambda row: {"caption": "a photo"}, remove_columns=["image"]
    ).to_parquet(str(tmp_path / "text.parquet"))
    text = str(tmp_path / "text.parquet")
    message = bad(world, shade={"train": text, "test": text, "inputs": "[caption]"})
    assert "not an image" in message
    # a folder that holds neither a saved split nor class folders of images
    (tmp_path / "empty_dir" / "x").mkdir(parents=True)
    message = bad(world, colour={"test": tmp_path / "empty_dir"})
    assert message.startswith("taskset.data.colour.test: ") and "image folder" in message
    # a class folder the fine-tune's id2label does not name
    tiny_images.write_image_folder(tmp_path / "purple", ["red", "purple"], seed=0)
    message = bad(world, colour={"train": tmp_path / "purple", "test": tmp_path / "purple"})
    assert message.startswith("model.checkpoints.finetuned.colour: label 'purple'")
    # a text task set for the image family
    message = bad(world, "taskset.family=text")
    assert message.startswith("taskset.family: ")
