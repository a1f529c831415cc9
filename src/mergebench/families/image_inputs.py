"""Arrays of images as an ImageNet-normalised batch: what the zoo's vision families feed
their models (grayscale or RGB uint8 images of any size)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def imagenet_batch(inputs: Sequence[np.ndarray] | np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 `[B, H, W]` (grayscale) or `[B, H, W, C]` images -> float32 `[B, 3, size, size]`:
    scaled to [0, 1], resized (bilinear, antialiased) when needed, grayscale copied to three
    channels, normalised with ImageNet's mean and standard deviation."""
    images = torch.as_tensor(np.asarray(inputs), dtype=torch.float32) / 255.0
    if images.ndim == 3:  # grayscale [B, H, W] -> [B, 1, H, W]
        images = images.unsqueeze(1)
    elif images.ndim == 4 and images.shape[-1] in (1, 3):  # [B, H, W, C] -> [B, C, H, W]
        images = images.permute(0, 3, 1, 2)
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear",
            align_corners=False, antialias=True,
        )  # fmt: skip
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images - _MEAN) / _STD
