"""open_clip families (`openclip_vit_b32`, `openclip_vit_b16`, `openclip_vit_l14`): the paper's
own CLIP setting, the task_vectors checkpoints (Ilharco et al.) on open_clip models.

The runnable model is open_clip's vision tower, `open_clip.create_model(<arch>).visual`
(architecture `ViT-B-32`, `ViT-B-16`, `ViT-L-14`; QuickGELU as the OpenAI weights were
trained), followed by a zero-shot head: logits = classifier(normalise(visual(image))).
Keys: `visual.*` (merged, the visual projection `visual.proj` included, as task_vectors
merges the whole image encoder) and `classifier.weight` (per task, never merged).

Checkpoints are state dicts under open_clip's `create_model` key names (`visual.conv1.weight`,
`transformer.resblocks.0...`, `logit_scale`): a `.safetensors` file, a `.pt` state dict read
with `torch.load(weights_only=True)`, or a folder holding `open_clip_model.safetensors` (the
hub's `timm/vit_base_patch32_clip_224.openai` layout). The task_vectors release pickles whole
modules: convert them first with `mergebench-convert --trust-pickle` (docs/paper-settings.md).

A task's head, as task_vectors builds it: per class, encode every template with the
pretrained text tower, L2-normalise, average over the templates, L2-normalise again, times
logit_scale.exp(). The pretrained checkpoint must therefore be a full open_clip model (text
tower included; task_vectors' `zeroshot.pt` lacks it). Heads are cached on disk like CLIP's.
Images are preprocessed with open_clip's evaluation transform for the model's
`preprocess_cfg` (resize, centre crop, normalise with the OpenAI mean and std).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergebench.data.hf import DataSpec
from mergebench.engine.pool import Batch
from mergebench.families.clip_prompts import PromptSet
from mergebench.families.paper import PaperFamily
from mergebench.families.zero_shot import ZeroShotHeads, cache_root, spaced_hash
from mergebench.util.errors import MergeBenchError

# Files of an open_clip model in a hub folder (timm/*_clip_224.openai), in order of preference.
OPENCLIP_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def openclip_file(path: Path) -> Path:
    """The open_clip weights in a hub folder (open_clip_model.safetensors), else `path`."""
    if path.is_dir():
        for name in OPENCLIP_FILES:
            if (path / name).is_file():
                return path / name
    return path


class ZeroShotOpenCLIP(nn.Module):
    """open_clip's vision tower and a zero-shot head: image -> class logits."""

    def __init__(self, visual: nn.Module, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.visual = visual
        # Rows: logit_scale.exp() * normalised text embedding of each class.
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.normalize(self.visual(pixel_values), dim=-1))


class OpenCLIPFamily(ZeroShotHeads, PaperFamily):
    name = "openclip"
    kind = "clip"  # the clip8 task set (`family: clip`) serves both CLIP implementations
    backbone_prefix = "visual"
    head_patterns = (r"classifier\..*",)

    def __init__(
        self,
        tasks,
        pretrained_path: Path,
        specs: Mapping[str, DataSpec],
        arch: str = "ViT-B-32",
        quick_gelu: bool = True,
        arch_config: str | None = None,
        eval_batch_size: int = 64,
        head_cache: str | None = None,
        text_batch_size: int = 256,
    ) -> None:
        super().__init__(tasks, openclip_file(Path(pretrained_path)), specs, eval_batch_size)
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        if arch_config:  # a json model config (or a folder of them) named by its file stem
            config = Path(arch_config).expanduser()
            if not config.exists():
                raise MergeBenchError(f"model.options.arch_config: {config} not found")
            open_clip.add_model_config(config)
        if open_clip.get_model_config(arch) is None:
            raise MergeBenchError(
                f"model.options.arch: {arch!r} is not an open_clip architecture "
                "(e.g. ViT-B-32, ViT-B-16, ViT-L-14; or register one with model.options.arch_config)"
            )
        self.arch = arch
        self.quick_gelu = bool(quick_gelu)
        with torch.device("meta"):  # the architecture and preprocessing, no weights
            shape = self._create(device="meta")
        self.embed_dim = int(shape.visual.output_dim)
        self.preprocess_cfg = open_clip.get_model_preprocess_cfg(shape)
        self.transform = image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)
        self.head_cache = cache_root(head_cache)
        self.text_batch_size = text_batch_size
        self._heads: dict[str, dict[str, torch.Tensor]] = {}

    def _create(self, device: str = "cpu") -> nn.Module:
        import open_clip

        quiet = _DropRandomInitWarning()  # weights come from the checkpoints, always
        logging.getLogger().addFilter(quiet)
        try:
            return open_clip.create_model(
                self.arch, pretrained=None, device=device, force_quick_gelu=self.quick_gelu
            )
        finally:
            logging.getLogger().removeFilter(quiet)

    # -- data ---------------------------------------------------------------------------------
    def encode(self, inputs: Sequence[Any]) -> Batch:
        return {"pixel_values": torch.stack([self.transform(_pil(x)) for x in inputs])}

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["pixel_values"])

    # -- models -------------------------------------------------------------------------------
    def _visual(self) -> nn.Module:
        """The vision tower alone (as `create_model(arch).visual`, without the text tower)."""
        import open_clip

        build = getattr(open_clip.model, "_build_vision_tower", None)
        if build is None:  # pragma: no cover - other open_clip versions
            device = "meta" if torch.empty(0).is_meta else "cpu"
            return self._create(device=device).visual
        cfg = open_clip.get_model_config(self.arch)
        quick = self.quick_gelu or bool(cfg.get("quick_gelu", False))
        return build(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick)

    def _new_model(self, num_classes: int) -> nn.Module:
        return ZeroShotOpenCLIP(self._visual(), self.embed_dim, num_classes)

    def head_tensors(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self._heads:
            self._heads[task] = {"classifier.weight": self.zeroshot_weights(task)}
        return self._heads[task]

    # -- zero-shot heads (cached by ZeroShotHeads) -------------------------------------------
    hash_head = staticmethod(spaced_hash)

    def head_identity(self) -> dict[str, Any]:
        return {"family": "open_clip", "arch": self.arch, "quick_gelu": self.quick_gelu}

    def text_model(self) -> nn.Module:
        """The full open_clip model with the pretrained text tower (the vision tower is left
        as initialised: only `encode_text` and `logit_scale` are used)."""
        source = self.pretrained_source()
        model = self._create()
        wanted = [k for k in model.state_dict() if k.startswith(TEXT_PREFIXES)]
        wanted += ["text_projection", "logit_scale"]
        missing = [k for k in wanted if k not in source]
        if missing:
            raise MergeBenchError(
                f"model.checkpoints.pretrained: {source.name} lacks the text tower ({missing[0]!r} "
                "and more); the pretrained model must be a full open_clip model (e.g. "
                "timm/vit_base_patch32_clip_224.openai), not task_vectors' zeroshot.pt"
            )
        try:
            model.load_state_dict({k: source.get(k).float() for k in wanted}, strict=False)
        except RuntimeError as err:
            raise MergeBenchError(
                f"model.checkpoints.pretrained: {source.name} does not fit open_clip "
                f"{self.arch} ({_first_line(err)})"
            ) from None
        return model.eval()

    @torch.inference_mode()
    def compute_zeroshot_weights(self, prompts: PromptSet) -> torch.Tensor:
        import open_clip

        tokenizer = open_clip.get_tokenizer(self.arch)
        model = self.text_model()
        texts = [t.format(c) for c in prompts.classnames for t in prompts.templates]
        chunks = []
        for start in range(0, len(texts), self.text_batch_size):
            tokens = tokenizer(texts[start : start + self.text_batch_size])
            chunks.append(F.normalize(model.encode_text(tokens), dim=-1))
        per_template = torch.cat(chunks).view(len(prompts.classnames), len(prompts.templates), -1)
        scale = float(model.logit_scale.exp())
        return F.normalize(per_template.mean(dim=1), dim=-1) * scale


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns that a model built with pretrained=None is initialised randomly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _pil(image: Any) -> Any:
    """A PIL image (open_clip's transform converts it to RGB); arrays are wrapped."""
    if hasattr(image, "convert"):
        return image
    from PIL import Image

    return Image.fromarray(image)


__all__ = ["OpenCLIPFamily", "ZeroShotOpenCLIP", "openclip_file"]
