"""The vision zoo rebuilds bit for bit, whatever torch's thread count on the machine, and
whether its models train one after another or side by side in worker processes (a worker
starts with a cold cache of the packaged weights: filling it once drew from the global RNG and
moved the fine-tune's random stream, which this test caught).

CPU convolutions add up in a thread-count-dependent order: before `model.finetune.threads`
fixed the count, a build with 2 threads and one with 1 thread gave different weights
(seen: digits' checkpoint hashed c8671f1b... vs 38522ce5...). The multi-task model, trained on
batches that mix the tasks (`model.finetune.multitask_batches: mixed`), is checked too. Both
zoo vision families are covered: EfficientNet-Lite0 and the DINOv2 ViT-S/14 (at a 2x2 patch
grid, to stay fast)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mergebench.sources.zoo import ensure_zoo, zoo_workers
from mergebench.util.config import compose_config
from mergebench.util.errors import MergeBenchError

VISION_ZOOS = {  # model -> (task set, extra overrides)
    "efficientnet_lite0": ("vision", []),
    "dinov2_vits14": ("vision_vit", ["model.options.image_size=28"]),
}


def _build(root, threads: int, workers: int, model: str) -> dict[str, str]:
    taskset, extra = VISION_ZOOS[model]
    cfg = compose_config(
        [
            f"taskset={taskset}", f"model={model}", f"zoo.dir={root}", *extra,
            "taskset.tasks=[digits,faces]", "taskset.examples.train=64",
            "taskset.examples.validation=20", "taskset.examples.test=40",
            "model.finetune.epochs=1", "model.finetune.multitask_epochs=1",
            f"threads={threads}", f"zoo.workers={workers}",
        ]
    )  # fmt: skip
    before = torch.get_num_threads()
    try:
        ensure_zoo(cfg, progress=False, multitask=True)
    finally:
        torch.set_num_threads(before)
    digests = {}
    family = root / model
    for path in sorted(family.rglob("*.safetensors")):
        state = load_file(str(path))
        blob = b"".join(state[k].numpy().tobytes() for k in sorted(state))
        digests[str(path.relative_to(family))] = hashlib.sha256(blob).hexdigest()
    return digests


@pytest.mark.parametrize(
    "model",
    [
        "efficientnet_lite0",
        # about 45 s of CPU (338 s wall on the loaded 2-core machine, 2026-12-06): slow
        pytest.param("dinov2_vits14", marks=pytest.mark.slow),
    ],
)
def test_vision_zoo_is_bit_identical_across_thread_counts_and_workers(tmp_path, model):
    taskset = VISION_ZOOS[model][0]
    one = _build(tmp_path / "one", threads=1, workers=1, model=model)
    two = _build(tmp_path / "two", threads=2, workers=2, model=model)
    assert set(one) == {
        "digits.safetensors", "faces.safetensors", "pretrained.safetensors",
        f"multitask/{taskset}/backbone.safetensors",
        f"multitask/{taskset}/heads/digits.safetensors",
        f"multitask/{taskset}/heads/faces.safetensors",
    }  # fmt: skip
    assert one == two
    manifest = json.loads((tmp_path / "two" / model / "zoo.json").read_text())
    assert set(manifest["tasks"]) == {"digits", "faces"} and taskset in manifest["multitask"]


def test_zoo_workers_option():
    settings = {"threads": 1}
    assert zoo_workers({"workers": 3}, settings, jobs=5) == 3
    assert zoo_workers({"workers": 3}, settings, jobs=2) == 2  # no idle processes
    assert zoo_workers({}, {}, jobs=5) == 1  # training uses every core already
    assert zoo_workers({}, settings, jobs=5) == min(5, os.cpu_count() or 1)
    for bad in (0, -1, True, "2"):
        with pytest.raises(MergeBenchError, match="zoo.workers"):
            zoo_workers({"workers": bad}, settings, jobs=5)
