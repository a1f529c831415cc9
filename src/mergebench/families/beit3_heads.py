"""BEiT-3 task models: torchscale's multiway backbone (`beit3.*`) with the five task heads of
unilm's `beit3/modeling_finetune.py`, under the same key names, so a released fine-tuned
checkpoint loads as it is.

- `imagenet`: mean of the patch tokens, `fc_norm`, linear `head` (1000 classes).
- `vqav2`: `pooler` (LayerNorm + Linear + tanh on the first token), `head` (Linear 2D,
  LayerNorm, GELU, Linear to the answer vocabulary).
- `nlvr2`: both images with the sentence; the vision and language CLS tokens of each pass,
  concatenated (4D), into a two-layer MLP `head` (2 classes).
- `coco_captioning`: the text tokens attend causally to themselves and fully to the image;
  `mlm_head` predicts the masked next token (decoding in `mergebench.families.beit3_decoding`).
- `coco_retrieval`: image and text encoded apart; `vision_head`, `language_head` on the
  first token, L2-normalised; `logit_scale` (unused at evaluation).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergebench.util.errors import MergeBenchError

TASK_KINDS = ("imagenet", "vqav2", "nlvr2", "coco_captioning", "coco_retrieval")
# BEiT-3 base (unilm `_get_base_config`); `model.options.arch` overrides any of them (tests).
BASE_ARCH = {
    "embed_dim": 768,
    "heads": 12,
    "ffn_dim": 3072,
    "layers": 12,
    "patch_size": 16,
    "vocab_size": 64010,
}
# normalize_output=False for these tasks' released models (a final LayerNorm otherwise).
NO_OUTPUT_NORM = ("imagenet", "vqav2")


def _backbone(arch: Mapping[str, Any], img_size: int, normalize_output: bool) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torchscale imports timm.models.layers (deprecated)
            warnings.simplefilter("ignore", FutureWarning)
            from torchscale.architecture.config import EncoderConfig
            from torchscale.model.BEiT3 import BEiT3
    except ImportError as err:
        raise MergeBenchError(
            f"model=beit3_base needs torchscale ({err}): pip install --no-deps "
            "torchscale==0.3.0 fairscale==0.4.0"
        ) from None

    cfg = EncoderConfig(
        img_size=img_size,
        patch_size=int(arch["patch_size"]),
        vocab_size=int(arch["vocab_size"]),
        multiway=True,
        layernorm_embedding=False,
        normalize_output=normalize_output,
        no_output_layer=True,
        drop_path_rate=0.0,
        encoder_embed_dim=int(arch["embed_dim"]),
        encoder_attention_heads=int(arch["heads"]),
        encoder_ffn_embed_dim=int(arch["ffn_dim"]),
        encoder_layers=int(arch["layers"]),
    )
    return BEiT3(cfg)


class _Task(nn.Module):
    def __init__(self, arch: Mapping[str, Any], img_size: int, kind: str) -> None:
        super().__init__()
        self.beit3 = _backbone(arch, img_size, kind not in NO_OUTPUT_NORM)
        self.embed_dim = int(arch["embed_dim"])


class ImageClassifier(_Task):
    def __init__(self, arch: Mapping[str, Any], img_size: int, num_classes: int) -> None:
        super().__init__(arch, img_size, "imagenet")
        self.fc_norm = nn.LayerNorm(self.embed_dim)
        self.head = nn.Linear(self.embed_dim, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.beit3(textual_tokens=None, visual_tokens=image)["encoder_out"]
        return self.head(self.fc_norm(x[:, 1:, :].mean(1)))


class Pooler(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(self.norm(x[:, 0, :])))


class VQAClassifier(_Task):
    def __init__(self, arch: Mapping[str, Any], img_size: int, num_classes: int) -> None:
        super().__init__(arch, img_size, "vqav2")
        d = self.embed_dim
        self.pooler = Pooler(d)
        self.head = nn.Sequential(
            nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, num_classes)
        )

    def forward(self, image: torch.Tensor, text: torch.Tensor, padding_mask: torch.Tensor):
        out = self.beit3(
            textual_tokens=text, visual_tokens=image, text_padding_position=padding_mask
        )
        return self.head(self.pooler(out["encoder_out"]))


class TwoLayerMLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_in)
        self.dense1 = nn.Linear(d_in, d_hidden)
        self.norm2 = nn.LayerNorm(d_hidden)
        self.dense2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(F.gelu(self.norm2(self.dense1(self.norm1(x)))))


class PairClassifier(_Task):
    """NLVR2: one sentence about two images."""

    def __init__(self, arch: Mapping[str, Any], img_size: int, num_classes: int) -> None:
        super().__init__(arch, img_size, "nlvr2")
        d = self.embed_dim
        self.head = TwoLayerMLP(4 * d, 2 * d, num_classes)

    def forward(
        self,
        image: torch.Tensor,
        image2: torch.Tensor,
        text: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        n = text.shape[0]
        out = self.beit3(
            textual_tokens=torch.cat((text, text)),
            visual_tokens=torch.cat((image, image2)),
            text_padding_position=torch.cat((padding_mask, padding_mask)),
        )
        x, split = out["encoder_out"], out["multiway_split_position"]
        cls = torch.cat((x[:, 0, :], x[:, split, :]), dim=-1)
        first, second = cls[:n], cls[n:]
        return self.head(torch.cat((first, second), dim=-1))


class Captioner(_Task):
    """Masked-LM captioning: the next token is read at a [MASK] placed after the prefix."""

    def __init__(self, arch: Mapping[str, Any], img_size: int) -> None:
        super().__init__(arch, img_size, "coco_captioning")
        self.mlm_head = nn.Linear(self.embed_dim, int(arch["vocab_size"]))

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, padding_mask: torch.Tensor
    ) -> torch.Tensor:
        """Vocabulary logits at every text position `[B, T, V]`."""
        image_len = self.beit3.vision_embed.num_position_embeddings()
        text_len = text.shape[1]
        total = image_len + text_len
        allowed = torch.zeros((total, total), dtype=torch.long, device=text.device)
        allowed[:image_len, :image_len] = 1  # image to image
        allowed[image_len:, :image_len] = 1  # caption to image
        allowed[image_len:, image_len:] = torch.tril(
            torch.ones(text_len, text_len, dtype=torch.long, device=text.device)
        )
        out = self.beit3(
            textual_tokens=text,
            visual_tokens=image,
            text_padding_position=padding_mask,
            attn_mask=1 - allowed,
        )
        return self.mlm_head(out["encoder_out"][:, image_len:])


class Retriever(_Task):
    def __init__(self, arch: Mapping[str, Any], img_size: int) -> None:
        super().__init__(arch, img_size, "coco_retrieval")
        d = self.embed_dim
        self.language_head = nn.Linear(d, d, bias=False)
        self.vision_head = nn.Linear(d, d, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        x = self.beit3(textual_tokens=None, visual_tokens=image)["encoder_out"]
        return F.normalize(self.vision_head(x[:, 0, :]), dim=-1)

    def encode_text(self, text: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.beit3(textual_tokens=text, visual_tokens=None, text_padding_position=padding_mask)[
            "encoder_out"
        ]
        return F.normalize(self.language_head(x[:, 0, :]), dim=-1)


def build_task_model(
    kind: str, arch: Mapping[str, Any], img_size: int, num_classes: int
) -> nn.Module:
    """The model of one task kind (`TASK_KINDS`) with random weights."""
    if kind == "imagenet":
        return ImageClassifier(arch, img_size, num_classes)
    if kind == "vqav2":
        return VQAClassifier(arch, img_size, num_classes)
    if kind == "nlvr2":
        return PairClassifier(arch, img_size, num_classes)
    if kind == "coco_captioning":
        return Captioner(arch, img_size)
    if kind == "coco_retrieval":
        return Retriever(arch, img_size)
    raise MergeBenchError(f"taskset.tasks: unknown BEiT-3 task kind {kind!r} (known: {TASK_KINDS})")


__all__ = ["BASE_ARCH", "TASK_KINDS", "build_task_model"]
