"""The vision zoo rebuilds bit for bit, whatever torch's thread count on the machine.

CPU convolutions add up in a thread-count-dependent order: before `model.finetune.threads`
fixed the count, a build with 2 threads and one with 1 thread gave different weights
(seen: digits' checkpoint hashed c8671f1b... vs 38522ce5...). The multi-task model, trained on
batches that mix the tasks (`model.finetune.multitask_batches: mixed`), is checked too."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load_file

from mergebench.sources.zoo import ensure_zoo
from mergebench.util.config import compose_config


def _build(root, threads: int) -> dict[str, str]:
    cfg = compose_config(
        [
            "taskset=vision", "model=efficientnet_lite0", f"zoo.dir={root}",
            "taskset.tasks=[digits,faces]", "taskset.examples.train=64",
            "taskset.examples.validation=20", "taskset.examples.test=40",
            "model.finetune.epochs=1", "model.finetune.multitask_epochs=1",
            f"threads={threads}",
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


def test_vision_zoo_is_bit_identical_across_thread_counts(tmp_path):
    one = _build(tmp_path / "one", threads=1)
    two = _build(tmp_path / "two", threads=2)
    assert set(one) == {
        "digits.safetensors", "faces.safetensors", "pretrained.safetensors",
        "multitask/vision/backbone.safetensors", "multitask/vision/heads/digits.safetensors",
        "multitask/vision/heads/faces.safetensors",
    }  # fmt: skip
    assert one == two
