"""The zoo's multi-task reference: how its training batches are drawn, and the mixed-batch
forward pass (one backbone pass over several tasks' examples, each task's head on its rows)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from zoo_configs import VISION_MODEL, VISION_SET  # the same tiny vision set

from mergebench.sources import load_family
from mergebench.sources.zoo import finetune_settings, multitask_settings
from mergebench.sources.zoo.train import TaskBatches, mixed_logits
from mergebench.util.config import load_group
from mergebench.util.errors import MergeBenchError


@pytest.fixture(scope="module")
def vision():
    return load_family(VISION_MODEL, VISION_SET)


def _fingerprints(pixels: torch.Tensor) -> list[float]:
    return [round(float(x.double().sum()), 3) for x in pixels]


def _train_examples(data, task: str) -> Counter:
    batch, _ = next(data.batches(task, "train", data.num_examples(task, "train")))
    return Counter(_fingerprints(batch["pixel_values"]))


def test_per_task_batches_give_each_task_the_batches_of_its_own_run(vision):
    _, data = vision
    dataset = TaskBatches(data, data.tasks, batch_size=5, seed=3)
    for _epoch in range(2):
        per_task = Counter()
        for task, _batch, labels in dataset:
            per_task[task] += 1
            assert len(labels) <= 5
        # each task: as many batches per epoch as in its single-task run
        assert per_task == {t: math.ceil(data.num_examples(t, "train") / 5) for t in data.tasks}
    assert len(dataset) == sum(per_task.values())


def test_mixed_batches_see_every_example_once_per_epoch_and_mix_tasks(vision):
    _, data = vision
    dataset = TaskBatches(data, data.tasks, batch_size=6, seed=3, mixed=True)
    total = sum(data.num_examples(t, "train") for t in data.tasks)
    epochs = []
    for _epoch in range(2):
        seen = {t: Counter() for t in data.tasks}
        items = list(dataset)
        assert len(items) == len(dataset) == math.ceil(total / 6)
        for tasks, inputs, labels, sizes in items:
            assert len(labels) == sum(sizes) == len(inputs["pixel_values"]) <= 6
            assert list(tasks) == [t for t in data.tasks if t in tasks]  # grouped, in order
            for task, part in zip(tasks, inputs["pixel_values"].split(list(sizes)), strict=True):
                seen[task].update(_fingerprints(part))
        assert seen == {t: _train_examples(data, t) for t in data.tasks}
        assert any(len(tasks) > 1 for tasks, *_ in items)  # batches hold several tasks
        epochs.append([(tasks, sizes) for tasks, _, _, sizes in items])
    again = [(tasks, sizes) for tasks, _, _, sizes in TaskBatches(data, data.tasks, 6, 3, True)]
    assert again == epochs[0]  # reproducible for a seed
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_mixed_logits_equal_each_task_model_on_its_rows(vision):
    family, data = vision
    torch.manual_seed(0)
    models = {t: family.new_finetuning_model(t) for t in data.tasks}
    first = models[data.tasks[0]]
    for task in data.tasks[1:]:
        family.share_backbone(first, models[task])
    for model in models.values():
        model.eval()
    parts = [next(data.batches(t, "train", n)) for t, n in zip(data.tasks, (3, 5), strict=True)]
    inputs = {"pixel_values": torch.cat([b["pixel_values"] for b, _ in parts])}
    with torch.no_grad():
        mixed = mixed_logits(family, models, data.tasks, inputs, (3, 5))
        for task, (batch, _), logits in zip(data.tasks, parts, mixed, strict=True):
            own = family.logits(models[task], batch)
            assert logits.shape == own.shape == (len(batch["pixel_values"]), own.shape[1])
            torch.testing.assert_close(logits, own, rtol=1e-4, atol=1e-5)
    assert mixed[0].shape[1] != mixed[1].shape[1]  # each task's own head (10 vs 2 classes)


class _Padded:
    """Two tasks whose inputs are padded per batch to different lengths (as texts are)."""

    tasks = ["short", "long"]

    def num_examples(self, task, split):
        return 4

    def batches(self, task, split, batch_size, order=None):
        width = 3 if task == "short" else 7
        yield (
            {"input_ids": torch.zeros(len(order), width, dtype=torch.long)},
            torch.zeros(len(order), dtype=torch.long),
        )


def test_mixed_batches_of_inputs_of_different_shapes_are_a_clear_error():
    with pytest.raises(MergeBenchError, match="one shape across tasks"):
        for _ in TaskBatches(_Padded(), _Padded.tasks, batch_size=8, seed=0, mixed=True):
            pass


def test_multitask_batches_option():
    hp = {
        "epochs": 3, "batch_size": 32, "lr": 1e-4, "head_lr": 1e-3, "weight_decay": 0.0,
        "warmup": 0.1, "max_grad_norm": 1.0, "multitask_epochs": 3, "multitask_lr": 1e-3,
        "multitask_head_lr": 1e-2,
    }  # fmt: skip
    assert "batches" not in multitask_settings(finetune_settings({"finetune": hp}))
    mixed = finetune_settings({"finetune": {**hp, "multitask_batches": "mixed"}})
    assert multitask_settings(mixed)["batches"] == "mixed"
    with pytest.raises(MergeBenchError, match="multitask_batches"):
        finetune_settings({"finetune": {**hp, "multitask_batches": "sometimes"}})


def test_shipped_multitask_references_train_as_long_as_their_single_task_models():
    """The reference protocol. Text: multi-task epochs = single-task epochs, so each task
    gets the batches of its own run (1 of 2 epochs gave 89% of individual). Vision: batches
    mixed across tasks, since BatchNorm statistics train (one-task batches gave 75%: the model
    was evaluated with statistics of whichever tasks came last); 2 of 3 epochs already exceed
    individual."""
    text = finetune_settings(load_group("model", "minilm"))
    assert text["multitask_epochs"] == text["epochs"]
    assert multitask_settings(text).get("batches", "per_task") == "per_task"  # no BatchNorm
    vision = load_group("model", "efficientnet_lite0")
    assert vision["options"]["freeze_batchnorm_multitask"] is False
    assert multitask_settings(finetune_settings(vision))["batches"] == "mixed"


def test_each_seed_has_its_own_zoo_folder(tmp_path):
    from mergebench.sources.zoo import family_dir

    cfg = {"model": {"name": "minilm"}, "zoo": {"dir": str(tmp_path)}}
    assert family_dir({**cfg, "seed": 0}) == tmp_path / "minilm"  # existing caches stay valid
    assert family_dir(cfg) == tmp_path / "minilm"
    assert family_dir({**cfg, "seed": 2}) == tmp_path / "minilm-seed2"
