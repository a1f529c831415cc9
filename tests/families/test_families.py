"""Model families: real packaged weights, per-task heads, label-free inputs, frozen BatchNorm."""

from __future__ import annotations

import pytest
import torch
from zoo_configs import TEXT_MODEL, TEXT_SET, VISION_MODEL, VISION_SET

from mergebench.engine.pool import TaskFamily
from mergebench.families import check_pairing
from mergebench.families.base import HEAD
from mergebench.sources import load_family
from mergebench.util.errors import MergeBenchError


@pytest.fixture(scope="module")
def text():
    return load_family(TEXT_MODEL, TEXT_SET)


@pytest.fixture(scope="module")
def vision():
    return load_family(VISION_MODEL, VISION_SET)


def test_efficientnet_packaged_weights_recognise_a_cat():
    """The renamed ImageNet weights are the real ones: scikit-image's cat is an Egyptian cat."""
    from skimage.data import chelsea

    from mergebench.families.efficientnet import EfficientNetLite0Family, imagenet_classifier

    family = EfficientNetLite0Family({}, image_size=224)
    with torch.inference_mode():
        logits = imagenet_classifier()(family.encode(chelsea()[None])["pixel_values"])
    assert int(logits.argmax()) == 285  # ImageNet class 285: Egyptian cat


def test_minilm_packaged_weights_embed_meaning(text):
    """The pretrained encoder (mean pooling) puts paraphrases closer than unrelated text."""
    family, _ = text
    model = family.new_finetuning_model("rt_sentiment").eval()
    batch = family.encode(["a dog runs in the park", "a puppy is running outside", "stocks fell"])
    with torch.inference_mode():
        hidden = model.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_families_follow_the_task_family_protocol(text, vision):
    for family, data in (text, vision):
        assert isinstance(family, TaskFamily)
        for task in data.tasks:
            model = family.build_model(task)
            head = getattr(model, HEAD)
            assert head.out_features == data.num_classes(task), "each task keeps its own head"
            assert all(k.startswith(HEAD + ".") for k in model.state_dict() if "classifier" in k)
            batches = list(family.unlabeled_inputs(task, "test", max_examples=5, batch_size=2))
            assert [len(next(iter(b.values()))) for b in batches] == [2, 2, 1]
            for b in batches:
                assert not any("label" in k for k in b), "inputs only"
                with torch.inference_mode():
                    out = family.logits(model.eval(), b)
                assert out.shape == (len(next(iter(b.values()))), data.num_classes(task))


def test_family_holds_no_labels(text):
    """Labels are stripped at the source: nothing a method can reach holds them."""
    family, data = text
    reachable = [family.__dict__] + [vars(t) for t in family.tasks.values()]
    assert not any("label" in key for d in reachable for key in d)
    assert not hasattr(family, "batches") and hasattr(data, "batches")
    with pytest.raises(MergeBenchError, match="split"):
        next(family.unlabeled_inputs("rt_sentiment", "dev", None, 4))


def test_pretrained_state_fits_every_key_but_the_head(text, vision):
    for family, data in (text, vision):
        model = family.build_model(data.tasks[0])
        pretrained = family.pretrained_state()
        assert set(model.state_dict()) - set(pretrained) == {f"{HEAD}.weight", f"{HEAD}.bias"}


def test_frozen_batchnorm_keeps_statistics(vision):
    family, data = vision
    model = family.new_finetuning_model("digits")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    family.set_train_mode(model)
    assert model.training and model.classifier.training
    batch, labels = next(data.batches("digits", "train", 8))
    torch.nn.functional.cross_entropy(family.logits(model, batch), labels).backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The multi-task model (never merged) lets its statistics adapt.
    family.set_train_mode(model, multitask=True)
    assert model.bn1.training


def test_multitask_models_share_the_backbone(text):
    family, _ = text
    a = family.new_finetuning_model("rt_sentiment")
    b = family.build_model("bbc_news")
    family.share_backbone(a, b)
    assert a.encoder is b.encoder and a.classifier is not b.classifier
    assert a.classifier.out_features == 2 and b.classifier.out_features == 5


def test_mismatched_family_and_task_set_is_a_clear_error():
    with pytest.raises(MergeBenchError, match="taskset.family"):
        check_pairing(TEXT_MODEL, VISION_SET)
    with pytest.raises(MergeBenchError, match="is image"):
        check_pairing(TEXT_MODEL, {**TEXT_SET, "tasks": ["digits"]})
    with pytest.raises(MergeBenchError, match="model.options"):
        load_family({**TEXT_MODEL, "options": {"max_len": 3}}, TEXT_SET)
