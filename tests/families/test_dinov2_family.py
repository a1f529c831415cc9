"""`model=dinov2_vits14` and `taskset=vision_vit`: the converted DINOv2 backbone with one head
per task, fine-tuned by the zoo, merged and scored end to end at a tiny size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergebench.families import check_pairing, family_class
from mergebench.families.base import HEAD, TaskInputs
from mergebench.families.dinov2 import Dinov2ViTS14Family
from mergebench.families.dinov2_onnx import timm_backbone
from mergebench.util.config import compose_config, load_group
from mergebench.util.errors import MergeBenchError


def test_backbone_is_the_converted_one_and_the_head_is_classifier():
    family = Dinov2ViTS14Family({"t": TaskInputs(3, {})}, image_size=28)
    model = family.new_finetuning_model("t").eval()
    heads = [k for k in model.state_dict() if not k.startswith(("blocks.", "patch_embed."))]
    assert heads == ["cls_token", "pos_embed", "norm.weight", "norm.bias",
                     f"{HEAD}.weight", f"{HEAD}.bias"]  # fmt: skip
    rgb = np.random.default_rng(0).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    backbone = timm_backbone(28)
    with torch.inference_mode():
        for images in (rgb, gray):
            x = family.encode(images)["pixel_values"]
            assert x.shape == (2, 3, 28, 28)
            features = model.forward_head(model.forward_features(x), pre_logits=True)
            assert torch.equal(features, backbone(x))
            assert family.logits(model, {"pixel_values": x}).shape == (2, 3)


def test_multitask_models_share_the_class_token_and_position_table():
    """A ViT keeps its class token and position table on the model itself, not in a child
    module: the multi-task models share them too (else each task trained its own copy and
    the saved multi-task model had the first task's)."""
    family = Dinov2ViTS14Family({"a": TaskInputs(3, {}), "b": TaskInputs(5, {})}, image_size=28)
    a, b = family.new_finetuning_model("a"), family.build_model("b")
    family.share_backbone(a, b)
    shared_a = {n: p for n, p in a.named_parameters() if not n.startswith(HEAD)}
    shared_b = {n: p for n, p in b.named_parameters() if not n.startswith(HEAD)}
    assert {"cls_token", "pos_embed"} <= shared_a.keys() and shared_a.keys() == shared_b.keys()
    assert all(shared_a[n] is shared_b[n] for n in shared_a)
    assert a.classifier is not b.classifier and b.classifier.out_features == 5


@pytest.mark.parametrize("size", [0, 30, "56"])
def test_image_size_must_be_a_multiple_of_the_patch(size):
    with pytest.raises(MergeBenchError, match=r"^model\.options\.image_size"):
        Dinov2ViTS14Family({}, image_size=size)


def test_vision_vit_task_set_pairs_with_the_vit_and_has_colour_tasks():
    model, taskset = load_group("model", "dinov2_vits14"), load_group("taskset", "vision_vit")
    check_pairing(model, taskset)
    assert family_class(model) is Dinov2ViTS14Family
    assert len(taskset["tasks"]) >= 6 and {"emoji", "openclipart"} <= set(taskset["tasks"])
    assert taskset["examples"]["test"] >= 1000  # Fashion-MNIST, MNIST, animal-mnist have them
    assert model["exclude"] == [r"classifier\..*"] and model["finetune"]["threads"] == 1
    # chosen by measurement (docs/benchmark.md): LP-FT heads; five of six fine-tunes clearly
    # above their probes (Fashion-MNIST +0.7 is not)
    assert taskset["tasks"] == ["fashion_mnist", "mnist", "animal_mnist", "emoji",
                                "openclipart", "digits"]  # fmt: skip
    assert model["finetune"]["head_init"] == "probe"
    with pytest.raises(MergeBenchError, match="taskset.family"):
        check_pairing(load_group("model", "efficientnet_lite0"), taskset)


@pytest.mark.slow  # about 30 s of CPU (300 s wall on the loaded 2-core machine)
def test_tiny_vit_zoo_merges_and_scores(tmp_path):
    """Zoo (two tasks, 16 images at a 2x2 patch grid), task arithmetic, test scores."""
    from mergebench.bench.job import run

    cfg = compose_config(
        [
            "model=dinov2_vits14", "taskset=vision_vit", "taskset.tasks=[digits,faces]",
            "model.options.image_size=28", "taskset.examples.train=16",
            "taskset.examples.validation=8", "taskset.examples.test=12",
            "model.finetune.epochs=1", "model.finetune.multitask_epochs=1",
            "method=task_arithmetic", "protocol.select=false", f"zoo.dir={tmp_path / 'zoo'}",
            f"store.path={tmp_path / 'results.sqlite'}", "progress=false",
        ]
    )  # fmt: skip
    summary = run(cfg)
    assert [s["task"] for s in summary["scores"]] == ["digits", "faces"]
    assert all(0.0 <= s["value"] <= 1.0 for s in summary["scores"])
    assert (tmp_path / "zoo" / "dinov2_vits14" / "faces.safetensors").exists()
