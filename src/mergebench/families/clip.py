"""CLIP families (`clip_vit_b32`, `clip_vit_b16`, `clip_vit_l14`): the vision towers are
merged, each task classifies with a zero-shot head made from text prompts.

As in FusionBench: the pretrained model is a full Hugging Face `CLIPModel`
(`openai/clip-vit-base-patch32`), each fine-tuned model a `CLIPVisionModel`
(`tanganke/clip-vit-base-patch32_<task>`) trained against a frozen zero-shot head. A task's
head: per class, encode every template with the pretrained text tower, L2-normalise,
average over the templates, L2-normalise again; logits = logit_scale.exp() * text @ image,
where the image features are the visual projection of the pooled output, L2-normalised.

The runnable model's keys: `vision_model.*` (merged), `visual_projection.weight` and
`classifier.weight` (the projection and the scaled text embeddings, per task and never
merged). The vision checkpoints have no head: the family computes each task's head once,
caches it on disk (keyed by the pretrained weights, class names and templates), and hands it
to the pool with every task's checkpoint, so merged models load like any other family's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergebench.data.hf import DataSpec
from mergebench.engine.pool import Batch
from mergebench.engine.renamed import canonical_source
from mergebench.families.base import model_folder
from mergebench.families.clip_prompts import PromptSet
from mergebench.families.paper import PaperFamily
from mergebench.families.zero_shot import ZeroShotHeads, cache_root, prompt_set
from mergebench.util.errors import MergeBenchError, first_line


def _inner(model: nn.Module, attribute: str) -> nn.Module:
    # transformers 4 wraps the tower (`CLIPVisionModel.vision_model`); version 5 does not.
    return getattr(model, attribute, model)


class ZeroShotCLIP(nn.Module):
    """CLIP's vision tower, its projection and a zero-shot head: image -> class logits."""

    def __init__(self, vision_config: Any, projection_dim: int, num_classes: int) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        self.vision_model = _inner(CLIPVisionModel(vision_config), "vision_model")
        hidden = vision_config.hidden_size
        self.visual_projection = nn.Linear(hidden, projection_dim, bias=False)
        # Rows: logit_scale.exp() * normalised text embedding of each class.
        self.classifier = nn.Linear(projection_dim, num_classes, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        image = F.normalize(self.visual_projection(pooled), dim=-1)
        return self.classifier(image)


class CLIPFamily(ZeroShotHeads, PaperFamily):
    name = "clip"
    kind = "clip"
    backbone_prefix = "vision_model"
    head_patterns = (r"visual_projection\..*", r"classifier\..*")

    def __init__(
        self,
        tasks,
        pretrained_path: Path,
        specs: Mapping[str, DataSpec],
        eval_batch_size: int = 64,
        head_cache: str | None = None,
        text_batch_size: int = 256,
        image_backend: str = "pil",
    ) -> None:
        super().__init__(tasks, pretrained_path, specs, eval_batch_size)
        from transformers import CLIPConfig

        folder = model_folder(pretrained_path)
        try:
            self.config = CLIPConfig.from_pretrained(str(folder))
        except Exception as err:
            raise MergeBenchError(
                f"model.checkpoints.pretrained: {folder} has no CLIP config.json ({err}); the "
                "pretrained model must be a full CLIP model (it has the text tower for the heads)"
            ) from None
        self.head_cache = cache_root(head_cache)
        self.text_batch_size = text_batch_size
        self.processor = _image_processor(folder, image_backend)
        self._heads: dict[str, dict[str, torch.Tensor]] = {}

    # -- data ---------------------------------------------------------------------------------
    def encode(self, inputs: Sequence[Any]) -> Batch:
        images = [_rgb(image) for image in inputs]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels}

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["pixel_values"])

    # -- models -------------------------------------------------------------------------------
    def _new_model(self, num_classes: int) -> nn.Module:
        return ZeroShotCLIP(self.config.vision_config, self.config.projection_dim, num_classes)

    def head_tensors(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self._heads:
            source = self.pretrained_source()
            if "visual_projection.weight" not in source:
                raise MergeBenchError(
                    f"model.checkpoints.pretrained: {source.name} has no visual_projection.weight; "
                    "the pretrained model must be a full CLIP model (CLIPModel), not a vision tower"
                )
            self._heads[task] = {
                "visual_projection.weight": source.get("visual_projection.weight").float(),
                "classifier.weight": self.zeroshot_weights(task),
            }
        return self._heads[task]

    # -- zero-shot heads (cached by ZeroShotHeads) -------------------------------------------
    def _text_tower(self) -> tuple[nn.Module, nn.Module, float]:
        from transformers import CLIPTextModel

        source = self.pretrained_source()
        text = _inner(CLIPTextModel(self.config.text_config), "text_model")
        wanted = [f"text_model.{k}" for k in text.state_dict()]
        keyed = canonical_source(source, wanted, "text_model", "model.checkpoints.pretrained")
        text.load_state_dict({k[len("text_model.") :]: keyed.get(k) for k in wanted}, strict=True)
        if "text_projection.weight" not in source or "logit_scale" not in source:
            raise MergeBenchError(
                f"model.checkpoints.pretrained: {source.name} lacks text_projection.weight or "
                "logit_scale; the pretrained model must be a full CLIP model"
            )
        projection = nn.Linear(*reversed(source.shape("text_projection.weight")), bias=False)
        projection.weight.data = source.get("text_projection.weight").float()
        scale = float(source.get("logit_scale").float().exp())
        return text.eval(), projection.eval(), scale

    @torch.inference_mode()
    def compute_zeroshot_weights(self, prompts: PromptSet) -> torch.Tensor:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_folder(self.pretrained_path)))
        text, projection, scale = self._text_tower()
        texts = [t.format(c) for c in prompts.classnames for t in prompts.templates]
        max_length = self.config.text_config.max_position_embeddings
        chunks = []
        for start in range(0, len(texts), self.text_batch_size):
            enc = tokenizer(
                texts[start : start + self.text_batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            pooled = text(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).pooler_output
            chunks.append(F.normalize(projection(pooled), dim=-1))
        per_template = torch.cat(chunks).view(len(prompts.classnames), len(prompts.templates), -1)
        return F.normalize(per_template.mean(dim=1), dim=-1) * scale


def _rgb(image: Any) -> Any:
    """PIL images in RGB (MNIST and friends are grayscale); arrays pass through."""
    convert = getattr(image, "convert", None)
    return (
        convert("RGB") if convert is not None and getattr(image, "mode", "RGB") != "RGB" else image
    )


def _image_processor(folder: Path, backend: str):
    """The pretrained model's image processor. `pil` is the PIL pipeline that FusionBench's
    checkpoints were fine-tuned with (transformers 5 defaults to a torchvision one)."""
    import transformers
    from transformers import AutoImageProcessor

    if backend not in ("pil", "torchvision"):
        raise MergeBenchError(f"model.options.image_backend: {backend!r} is not pil or torchvision")
    major = int(transformers.__version__.split(".")[0])
    kwargs = {"backend": backend} if major >= 5 else {"use_fast": backend != "pil"}
    try:
        return AutoImageProcessor.from_pretrained(str(folder), **kwargs)
    except Exception as err:
        first = first_line(err)
        raise MergeBenchError(
            f"model.checkpoints.pretrained: no image processor in {folder} ({first})"
        ) from None


__all__ = ["CLIPFamily", "ZeroShotCLIP", "cache_root", "prompt_set"]
