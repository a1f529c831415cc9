"""Tiny image classifiers of one's own and their data, made on the spot: a transformers ViT
base with two fine-tunes (`save_pretrained`), the same with timm (`save_for_hf`), and image
data as class folders, a `save_to_disk` folder and Parquet (PIL images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VIT = dict(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2,
)  # fmt: skip
TIMM = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
COLOURS = ["red", "green", "blue"]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def make_vit_base(folder: Path, bare: bool = False, seed: int = 0, **changes) -> Path:
    """A ViT base with its image processor: a `ViTForImageClassification` (keys `vit.*`), or
    with `bare` a `ViTModel` (keys `embeddings.*`, as google/vit-base-patch16-224-in21k)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(**{**VIT, **changes})
    (ViTModel(config) if bare else ViTForImageClassification(config)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def make_vit_finetuned(base: Path, folder: Path, labels: list[str] | int, seed: int) -> Path:
    """A `ViTForImageClassification` fine-tune of `base`: backbone perturbed, a random head;
    `labels` names the classes (`id2label`) or only counts them."""
    from transformers import AutoConfig, ViTForImageClassification

    count = labels if isinstance(labels, int) else len(labels)
    config = AutoConfig.from_pretrained(base, num_labels=count)
    if not isinstance(labels, int):
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    torch.manual_seed(seed)
    model = ViTForImageClassification.from_pretrained(
        base, config=config, ignore_mismatched_sizes=True
    )
    _perturb(model, seed)
    model.save_pretrained(folder)
    return folder


def make_timm(folder: Path, num_classes: int, labels: list[str] | None = None, seed: int = 0,
              base: Path | None = None) -> Path:  # fmt: skip
    """A tiny timm ViT saved as timm's hub folders are (`config.json` + `model.safetensors`):
    a base, or with `base` a fine-tune of it (backbone perturbed, a random head)."""
    import timm
    from safetensors.torch import load_file
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TIMM)
    if base is not None:
        backbone = {
            k: v for k, v in load_file(str(base / "model.safetensors")).items() if "head" not in k
        }
        model.load_state_dict(backbone, strict=False)
        _perturb(model, seed)
    config = {"label_names": labels} if labels else None
    save_for_hf(model, str(folder), model_config=config, safe_serialization=True)
    return folder


def images(labels: list, seed: int) -> list:
    """One small PIL image per label, its colour following the label's index in the list of
    distinct labels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    order = sorted(set(labels), key=str)
    out = []
    for label in labels:
        base = np.zeros((20, 20, 3))
        base[..., order.index(label) % 3] = 200
        pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(pixels))
    return out


def write_image_folder(folder: Path, labels: list[str], seed: int) -> Path:
    """`folder/<label>/<i>.png`, one image per label."""
    for i, (label, image) in enumerate(zip(labels, images(labels, seed), strict=True)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        image.save(folder / label / f"{i}.png")
    return folder


def image_table(labels: list[int], seed: int):
    """A `datasets.Dataset` with an `Image` column `image` and int labels."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict(
        {"image": images(labels, seed), "label": labels}, features=features
    )


def make_image_world(root: Path) -> Path:
    """What a user brings: `base/` (a ViT and its image processor), `colour/` (three named
    classes) and `shade/` (two unnamed), and their data: colour as class folders, shade as a
    Parquet train file and a save_to_disk test folder."""
    base = make_vit_base(root / "base")
    make_vit_finetuned(base, root / "colour", COLOURS, seed=1)
    make_vit_finetuned(base, root / "shade", 2, seed=2)
    write_image_folder(root / "data/colour_train", COLOURS * 6, seed=0)
    write_image_folder(root / "data/colour_test", ["blue", "red", "green"] * 3, seed=1)
    image_table([0, 1] * 10, seed=2).to_parquet(str(root / "data/shade_train.parquet"))
    image_table([1, 0] * 4, seed=3).save_to_disk(str(root / "data/shade_test"))
    return root
