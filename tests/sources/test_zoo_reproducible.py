"""The vision zoo rebuilds bit for bit, whatever torch's thread count on the machine, and
whether its models train one after another or side by side in worker processes (a worker
starts with a cold cache of the packaged weights: filling it once drew from the global RNG and
moved the fine-tune's random stream, which this test caught).

CPU convolutions add up in a thread-count-dependent order: before `model.finetune.threads`
fixed the count, a build with 2 threads and one with 1 thread gave different weights
(seen: digits' checkpoint hashed c8671f1b... vs 38522ce5...). The multi-task model, trained on
batches that mix the tasks (`model.finetune.multitask_batches: mixed`), is checked too."""

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


def _build(root, threads: int, workers: int) -> dict[str, str]:
    cfg = compose_config(
        [
            "taskset=vision", "model=efficientnet_lite0", f"zoo.dir={root}",
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
    family = root / "efficientnet_lite0"
    for path in sorted(family.rglob("*.safetensors")):
        state = load_file(str(path))
        blob = b"".join(state[k].numpy().tobytes() for k in sorted(state))
        digests[str(path.relative_to(family))] = hashlib.sha256(blob).hexdigest()
    return digests


def test_vision_zoo_is_bit_identical_across_thread_counts_and_workers(tmp_path):
    one = _build(tmp_path / "one", threads=1, workers=1)
    two = _build(tmp_path / "two", threads=2, workers=2)
    assert set(one) == {
        "digits.safetensors", "faces.safetensors", "pretrained.safetensors",
        "multitask/vision/backbone.safetensors", "multitask/vision/heads/digits.safetensors",
        "multitask/vision/heads/faces.safetensors",
    }  # fmt: skip
    assert one == two
    manifest = json.loads((tmp_path / "two" / "efficientnet_lite0" / "zoo.json").read_text())
    assert set(manifest["tasks"]) == {"digits", "faces"} and "vision" in manifest["multitask"]


def test_zoo_workers_option():
    settings = {"threads": 1}
    assert zoo_workers({"workers": 3}, settings, jobs=5) == 3
    assert zoo_workers({"workers": 3}, settings, jobs=2) == 2  # no idle processes
    assert zoo_workers({}, {}, jobs=5) == 1  # training uses every core already
    assert zoo_workers({}, settings, jobs=5) == min(5, os.cpu_count() or 1)
    for bad in (0, -1, True, "2"):
        with pytest.raises(MergeBenchError, match="zoo.workers"):
            zoo_workers({"workers": bad}, settings, jobs=5)
