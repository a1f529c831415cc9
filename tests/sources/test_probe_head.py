"""LP-FT's head initialisation (`model.finetune.head_init: probe`): each head starts as the
logistic-regression probe of the frozen pretrained features."""

from __future__ import annotations

import pytest
import torch
from zoo_configs import VISION_MODEL, VISION_SET  # the same tiny vision set

from mergebench.families.base import HEAD
from mergebench.sources import load_family
from mergebench.sources.zoo import finetune_settings
from mergebench.sources.zoo.probe import PROBE_L2, fit_probe_head, head_features
from mergebench.util.errors import MergeBenchError

HP = {
    "epochs": 1, "batch_size": 8, "lr": 1e-5, "head_lr": 1e-3, "weight_decay": 0.0,
    "warmup": 0.1, "max_grad_norm": 1.0, "multitask_epochs": 1, "multitask_lr": 1e-5,
    "multitask_head_lr": 1e-3,
}  # fmt: skip


def test_probe_head_minimises_the_regularised_loss_of_the_frozen_features():
    family, data = load_family(VISION_MODEL, VISION_SET)
    task = data.tasks[0]
    torch.manual_seed(0)
    model = family.new_finetuning_model(task)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if HEAD not in k}
    fit_probe_head(family, model, data, task)
    # the backbone is untouched; the head fits its training features
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone.items())
    features, labels = head_features(family, model, data, task)
    assert len(labels) == data.num_examples(task, "train")
    head = getattr(model, HEAD)
    w = head.weight.detach().clone().requires_grad_(True)
    b = head.bias.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(features, w, b), labels)
    (loss + PROBE_L2 * w.pow(2).sum()).backward()
    assert float(w.grad.abs().max()) < 1e-3 and float(b.grad.abs().max()) < 1e-3  # a minimum
    accuracy = float((head(features).argmax(1) == labels).float().mean())
    assert accuracy >= 0.9


def test_head_init_option():
    assert "head_init" not in finetune_settings({"finetune": HP})  # random heads by default
    assert finetune_settings({"finetune": {**HP, "head_init": "probe"}})["head_init"] == "probe"
    with pytest.raises(MergeBenchError, match=r"^model\.finetune\.head_init"):
        finetune_settings({"finetune": {**HP, "head_init": "zeros"}})
