"""The thirty-task ViT family (`vit_b16_in21k`, taskset=vit30): timm's ViT-B/16 pre-trained on
ImageNet-21k, one fine-tuned model per task, each with its own classification head.

The runnable model is `timm.create_model(arch, pretrained=False, num_classes=K, **model_kwargs)`
(arch `vit_base_patch16_224.augreg_in21k`; tests use a tiny timm ViT through `arch` and
`model_kwargs` such as img_size, patch_size, depth, embed_dim). Keys are timm's: `cls_token`,
`pos_embed`, `patch_embed.*`, `blocks.<i>.*`, `norm.*` (merged) and `head.*` (each task's
own, never merged; the pretrained checkpoint's 21k-class head is left out).

Checkpoints are timm state dicts: a `.safetensors` file, a `.pt` state dict (read with
`torch.load(weights_only=True)`), or a folder with `model.safetensors` (a timm hub repository
such as `timm/vit_base_patch16_224.augreg_in21k`). Images get timm's evaluation transform for
the model (resize, centre crop with the model's crop_pct, mean and std 0.5).

The paper's thirty fine-tuned checkpoints are not public; `fine_tune_task` makes one per task
from a task set's training split (docs/paper-settings.md has the recipe).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergebench.data.hf import DataSpec
from mergebench.data.hf_labels import class_names
from mergebench.engine.pool import Batch
from mergebench.families.labeled import HFLabeledData
from mergebench.families.paper import PaperFamily
from mergebench.util.errors import MergeBenchError

DEFAULT_ARCH = "vit_base_patch16_224.augreg_in21k"


class ViTFamily(PaperFamily):
    name = "vit"
    kind = "vit"
    modality = "image"
    backbone_prefix = "model"  # a checkpoint saved from a wrapper module (`model.blocks...`)
    head_patterns = (r"head\..*",)

    def __init__(
        self,
        tasks,
        pretrained_path: Path,
        specs: Mapping[str, DataSpec],
        arch: str = DEFAULT_ARCH,
        model_kwargs: Mapping[str, Any] | None = None,
        eval_batch_size: int = 64,
    ) -> None:
        super().__init__(tasks, pretrained_path, specs, eval_batch_size)
        from timm.data import create_transform, resolve_model_data_config

        self.arch = arch
        self.model_kwargs = dict(model_kwargs or {})
        try:
            with torch.device("meta"):  # the architecture and its data config, no weights
                shape = self._create(1)
        except (RuntimeError, TypeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MergeBenchError(
                f"model.options: timm cannot build {arch!r} with {self.model_kwargs} ({first})"
            ) from None
        config = resolve_model_data_config(shape)
        size = getattr(getattr(shape, "patch_embed", None), "img_size", None)
        if size is not None:  # img_size given as a keyword: the pretrained cfg still says 224
            config["input_size"] = (3, *tuple(size))
        self.data_config = config
        self.transform = create_transform(**config, is_training=False)

    def _create(self, num_classes: int) -> nn.Module:
        import timm

        return timm.create_model(
            self.arch, pretrained=False, num_classes=num_classes, **self.model_kwargs
        )

    @classmethod
    def task_classes(cls, spec: DataSpec) -> tuple[str, ...]:
        return class_names(spec)

    def encode(self, inputs: Sequence[Any]) -> Batch:
        return {"pixel_values": torch.stack([self.transform(_rgb(x)) for x in inputs])}

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["pixel_values"])

    def _new_model(self, num_classes: int) -> nn.Module:
        return self._create(num_classes)


def _rgb(image: Any) -> Any:
    """A PIL image in RGB (MNIST and friends are grayscale); arrays are wrapped."""
    from PIL import Image

    if not hasattr(image, "convert"):
        image = Image.fromarray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def fine_tune_task(
    family: ViTFamily,
    data: HFLabeledData,
    task: str,
    pretrained: Mapping[str, torch.Tensor],
    output: str | Path,
    epochs: int = 10,
    lr: float = 1e-5,
    weight_decay: float = 0.1,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Fine-tune the pretrained backbone with a fresh head on `task`'s training split (full
    fine-tuning, AdamW, cross-entropy) and save the whole model as one safetensors file in
    the family's key names: a checkpoint for `model.checkpoints.finetuned.<task>`.
    `pretrained` is the backbone's state dict (head keys, if any, are ignored)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = family.build_model(task)
    backbone = {k: v for k, v in pretrained.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise MergeBenchError(
            f"fine_tune_task: the pretrained weights do not fit {family.arch} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = data.num_examples(task, "train")
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).numpy()
        for batch, labels in data.batches(task, "train", batch_size, order=order):
            loss = F.cross_entropy(
                family.logits(model, {k: v.to(device) for k, v in batch.items()}),
                labels.to(device),
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    path = Path(output).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"task": task, "arch": family.arch})
    return path


__all__ = ["DEFAULT_ARCH", "ViTFamily", "fine_tune_task"]
