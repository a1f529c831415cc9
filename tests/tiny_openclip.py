"""Tiny open_clip and timm models and image data sets, made on the spot in the real formats.

The open_clip families load open_clip state dicts (`open_clip_model.safetensors` in a hub
folder, safetensors or `.pt` files, task_vectors' pickled `ImageEncoder` modules once
converted); the ViT family loads timm state dicts. These builders write the same formats
for models a few tens of thousands of parameters wide (plus open_clip's 49408-token
embedding, which its bundled tokenizer needs), so the real loading code runs offline.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

TINY_ARCH = "mb-tiny-ViT-8"
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def write_arch_config(folder: Path) -> Path:
    """An open_clip model config json (registered by the family's `arch_config` option)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def open_clip_model(config: Path, seed: int = 0) -> nn.Module:
    import open_clip

    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_ARCH, pretrained=None, force_quick_gelu=True)


def save_pretrained(model: nn.Module, folder: Path) -> Path:
    """The hub layout of an open_clip model (timm/*_clip_224.openai): open_clip_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG}))
    return folder


def task_vectors_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What task_vectors' ImageEncoder keeps of a CLIP model: the text transformer deleted."""
    return {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("transformer.")
    }


def save_image_encoder_pickle(model: nn.Module, path: Path) -> Path:
    """`torch.save(image_encoder)` as the task_vectors release does: the whole module,
    pickled, its class from a module (`src.modeling`) that does not exist where it is read."""
    module = types.ModuleType("task_vectors_modeling")

    class ImageEncoder(nn.Module):
        def __init__(self, clip: nn.Module) -> None:
            super().__init__()
            self.model = clip
            self.train_preprocess = None

    ImageEncoder.__module__ = module.__name__
    ImageEncoder.__qualname__ = "ImageEncoder"
    module.ImageEncoder = ImageEncoder
    sys.modules[module.__name__] = module
    try:
        encoder = ImageEncoder(model)
        del encoder.model.transformer  # as task_vectors does (keep_lang=False)
        torch.save(encoder, path)
    finally:
        del sys.modules[module.__name__]
    return path


def patterned(kind: str, classes: int, per_class: int, seed: int, gray: bool = False):
    """A `datasets.Dataset` whose classes differ by where a bright band lies (rows/columns)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    step = 20 // classes
    for c in range(classes):
        for _ in range(per_class):
            x = rng.normal(90, 20, (20, 20, 3))
            band = slice(step * c, step * c + step)
            if kind == "rows":
                x[band] += 140
            else:
                x[:, band] += 140
            image = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
            images.append(image.convert("L") if gray else image)
            labels.append(c)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def save_task(folder: Path, kind: str, classes: int, seed: int, gray: bool = False,
              label: str = "label", train: int = 8, test: int = 4) -> Path:  # fmt: skip
    """Train and test splits written with save_to_disk."""
    import datasets

    splits = {
        "train": patterned(kind, classes, train, seed, gray),
        "test": patterned(kind, classes, test, seed + 1, gray),
    }
    if label != "label":
        splits = {k: v.rename_column("label", label) for k, v in splits.items()}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


__all__ = [
    "TINY_ARCH",
    "TINY_CONFIG",
    "VIT_KWARGS",
    "open_clip_model",
    "patterned",
    "save_image_encoder_pickle",
    "save_pretrained",
    "save_task",
    "task_vectors_state",
    "write_arch_config",
]
