"""Image classifiers of one's own: the generic `hf_image_classification` family, fine-tunes of
one base saved by `transformers` (`AutoModelForImageClassification`: ViT, ConvNeXt, ResNet,
Swin ...) or by timm (`save_for_hf` / `push_to_hf_hub`: a `config.json` naming the
`architecture`, and `model.safetensors`).

Which library a checkpoint belongs to is read off the base folder's `config.json`: timm's
has `architecture` (and `model_args`, `pretrained_cfg`), transformers' has `model_type`.

- transformers: the runnable model is `AutoModelForImageClassification` built from the base's
  config with the task's number of labels. The backbone is the model's `base_model_prefix`
  (`vit.`, `convnext.`, `resnet.`); every other top-level module (`classifier.*`) is a task
  head, brought by each fine-tune and never merged. The base may be a bare backbone
  (`ViTModel`, keys without `vit.`): the prefix is matched per key. Images are prepared by the
  base folder's image processor (`AutoImageProcessor`, `preprocessor_config.json`).
- timm: the runnable model is `timm.create_model("local-dir:<base>", num_classes=K)` (timm
  reads the architecture and its arguments from the folder, offline). The heads are the
  model's `pretrained_cfg["classifier"]` (`head`, `fc`, `head.fc` ...). Images get timm's
  evaluation transform for the model's data config.

Each task's classes are its fine-tune's: `num_labels`/`id2label` (transformers), `num_classes`/
`label_names` (timm), mapped onto string labels of the data as `hf_sequence_classification`
does (`mergebench.families.hf_text.head_classes`). A fine-tune of another architecture than
the base's is refused before any tensor is read.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergebench.data.hf import DataSpec
from mergebench.data.hf_labels import class_names
from mergebench.engine.checkpoints import TensorReader, open_checkpoint
from mergebench.engine.keymatch import compile_patterns, is_excluded
from mergebench.engine.pool import Batch
from mergebench.engine.renamed import CanonicalSource, canonical_source
from mergebench.families.base import model_folder
from mergebench.families.hf_text import checkpoint_classes, head_classes
from mergebench.families.labeled import HFLabeledData
from mergebench.families.paper import PaperFamily
from mergebench.util.errors import MergeBenchError, first_line

PRETRAINED = "model.checkpoints.pretrained"


def _finetuned_option(task: str) -> str:
    return f"model.checkpoints.finetuned.{task}"


def timm_config(path: Path) -> dict[str, Any] | None:
    """The folder's timm `config.json` (one naming an `architecture`), else None."""
    file = model_folder(path) / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and "architecture" in config and "model_type" not in config:
        return config
    return None


def _auto_config(path: Path, option: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_folder(path)))
    except Exception as err:  # transformers raises OSError, ValueError, KeyError ...
        raise MergeBenchError(
            f"{option}: cannot load the config of {model_folder(path)} ({first_line(err)})"
        ) from None


def architecture(path: Path, option: str) -> str:
    """What a checkpoint is, to compare a fine-tune with its base: `timm <arch>` or
    `transformers <model_type>`."""
    timm = timm_config(path)
    if timm is not None:
        return f"timm {timm['architecture']}"
    return f"transformers {_auto_config(path, option).model_type}"


def checkpoint_names(model: nn.Module) -> Callable[[str], str]:
    """A checkpoint's key -> the model's: transformers 5 renames some models' weights on load
    (ViT's `encoder.layer.0.attention.attention.query` is `layers.0.attention.q_proj`) and
    back on save; transformers 4 reads the names as they are."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            PrefixChange,
            WeightConverter,
            WeightRenaming,
            apply_renamings,
        )
    except ImportError:
        return str
    transforms = get_model_conversion_mapping(model)
    if any(isinstance(t, WeightConverter) for t in transforms):
        raise MergeBenchError(
            f"{PRETRAINED}: transformers converts the weights of model type "
            f"{model.config.model_type!r} on load (fuses or splits tensors), which is not "
            "supported here; save the checkpoints with the model's own key names"
        )
    # A prefix is matched per key by the pool (canonical_source), not by transformers.
    renamings = [
        t for t in transforms if isinstance(t, WeightRenaming) and not isinstance(t, PrefixChange)
    ]
    return lambda key: apply_renamings(key, renamings)


def _rgb(value: Any, where: str):
    """One input as an RGB PIL image: a PIL image, an array, a Parquet image struct
    ({bytes, path}) or a path to an image file."""
    from PIL import Image

    if isinstance(value, Mapping):
        if value.get("bytes"):
            value = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            value = value["path"]
    if isinstance(value, str) and Path(value).is_file():
        value = Image.open(value)
    elif hasattr(value, "__array__") and not hasattr(value, "convert"):
        value = Image.fromarray(value)
    if not hasattr(value, "convert"):
        raise MergeBenchError(
            f"{where}: an input is {type(value).__name__} {str(value)[:40]!r}, not an image "
            "(the inputs column must hold images, image structs or image file paths)"
        )
    return value if value.mode == "RGB" else value.convert("RGB")


class HFImageClassificationFamily(PaperFamily):
    """Fine-tunes of one image classifier (transformers or timm); `from_config` picks the
    library's family from the base checkpoint."""

    name = "hf_image_classification"
    kind = "hf_image_classification"
    modality = "image"
    reads_finetuned = True
    # A checkpoint's key -> the model's, where the library renames keys on load.
    rename_key: Callable[[str], str] | None = None

    @classmethod
    def from_config(
        cls,
        cfg_model: Mapping[str, Any],
        cfg_taskset: Mapping[str, Any],
        seed: int,
        pretrained: Path,
        finetuned: Mapping[str, Path] | None = None,
    ) -> tuple[PaperFamily, HFLabeledData]:
        if cls is HFImageClassificationFamily:  # the generic entry: pick the library
            impl = TimmImageFamily if timm_config(pretrained) else TransformersImageFamily
            return impl.from_config(cfg_model, cfg_taskset, seed, pretrained, finetuned)
        base = architecture(pretrained, PRETRAINED)
        for task, path in (finetuned or {}).items():
            own = architecture(path, _finetuned_option(task))
            if own != base:
                raise MergeBenchError(
                    f"{_finetuned_option(task)}: {model_folder(path)} is a {own} model, the "
                    f"base {model_folder(pretrained)} a {base} model: fine-tunes of one base "
                    "merge"
                )
        return super().from_config(cfg_model, cfg_taskset, seed, pretrained, finetuned)

    # -- what the two libraries provide ------------------------------------------------------
    @classmethod
    def checkpoint_head(cls, spec: DataSpec, path: Path) -> DataSpec:
        """`spec` with the classes of the fine-tune at `path`."""
        raise NotImplementedError

    def pixels(self, images: list[Any]) -> torch.Tensor:
        """RGB PIL images to the model's `pixel_values`."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    @classmethod
    def task_specs(
        cls, specs: dict[str, DataSpec], finetuned: Mapping[str, Path] | None
    ) -> dict[str, DataSpec]:
        if finetuned is None:
            return specs
        return {task: cls.checkpoint_head(spec, finetuned[task]) for task, spec in specs.items()}

    @classmethod
    def task_classes(cls, spec: DataSpec) -> tuple[str, ...]:
        return class_names(spec)

    def encode(self, inputs: Sequence[Any]) -> Batch:
        where = f"model {self.name}"
        return {"pixel_values": self.pixels([_rgb(x, where) for x in inputs])}

    def pool_sources(
        self, finetuned: Mapping[str, Path]
    ) -> tuple[TensorReader, dict[str, TensorReader]]:
        """The checkpoints under the model's key names (`OwnPoolSources`): each key as saved,
        renamed as transformers renames it on load, with or without the backbone prefix."""
        heads = compile_patterns(self.head_patterns)
        first = next(iter(self.tasks))
        backbone = [k for k in self.model_keys(first) if not is_excluded(k, heads)]
        pretrained = self._source(self.pretrained_path, "pretrained", PRETRAINED, first, backbone)
        tasks = {
            task: self._source(
                path, f"finetuned[{task}]", _finetuned_option(task), task, self.model_keys(task)
            )
            for task, path in finetuned.items()
        }
        return pretrained, tasks

    def _source(
        self, path: Path, role: str, option: str, task: str, keys: list[str]
    ) -> TensorReader:
        """One checkpoint under the model's names, every tensor of the model's shape (read
        off the files' headers: a fine-tune of another size fails here, in one line)."""
        source = canonical_source(self._open(path, role), keys, self.backbone_prefix, option)
        with torch.device("meta"):
            model = self._new_model(self._task(task).num_classes)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for key in keys:
            if tuple(source.shape(key)) != shapes[key]:
                raise MergeBenchError(
                    f"{option}: {key!r} has shape {list(source.shape(key))} in "
                    f"{source.name}, the base's model {list(shapes[key])} (a model of "
                    "another size?)"
                )
        return source

    def _open(self, path: Path, role: str) -> TensorReader:
        reader = open_checkpoint(path, role=role)
        if self.rename_key is None:
            return reader
        names = {self.rename_key(k): k for k in reader.keys()}
        if all(ours == theirs for ours, theirs in names.items()):
            return reader
        return CanonicalSource(reader, names)

    def _heads_of(self, probe: nn.Module, heads: Sequence[str]) -> None:
        """Head patterns for the modules `heads`, which must be in the model."""
        keys = list(probe.state_dict())
        missing = [h for h in heads if not any(k.startswith(h + ".") for k in keys)]
        if not heads or missing:
            raise MergeBenchError(
                f"{PRETRAINED}: cannot tell the task head of {model_folder(self.pretrained_path)} "
                f"(head modules {list(heads)} not among its keys {keys[-3:]})"
            )
        self.head_patterns = tuple(re.escape(h) + r"\..*" for h in heads)


class TransformersImageFamily(HFImageClassificationFamily):
    """`AutoModelForImageClassification` fine-tunes; images by the base's image processor."""

    def __init__(
        self,
        tasks,
        pretrained_path: Path,
        specs: Mapping[str, DataSpec],
        eval_batch_size: int = 64,
    ) -> None:
        super().__init__(tasks, pretrained_path, specs, eval_batch_size)
        from transformers import AutoImageProcessor

        folder = model_folder(pretrained_path)
        self.config = _auto_config(pretrained_path, PRETRAINED)
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(folder))
        except Exception as err:  # OSError, ValueError ...: no or a broken processor file
            raise MergeBenchError(
                f"{PRETRAINED}: cannot load the image processor of {folder} ({first_line(err)}); "
                "save the one the fine-tunes used there (AutoImageProcessor...save_pretrained)"
            ) from None
        with torch.device("meta"):
            probe = self._new_model(2)
        self.backbone_prefix = str(probe.base_model_prefix)
        heads = sorted(
            {
                k.split(".")[0]
                for k in probe.state_dict()
                if not k.startswith(self.backbone_prefix + ".")
            }
        )
        self._heads_of(probe, heads)
        self.rename_key = checkpoint_names(probe)

    @classmethod
    def checkpoint_head(cls, spec: DataSpec, path: Path) -> DataSpec:
        return checkpoint_classes(spec, path)

    def pixels(self, images: list[Any]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"]).logits

    def _new_model(self, num_classes: int) -> nn.Module:
        from transformers import AutoModelForImageClassification

        config = self.config.__class__.from_dict(self.config.to_dict())
        config.num_labels = num_classes
        try:
            return AutoModelForImageClassification.from_config(config)
        except ValueError as err:  # "Unrecognized configuration class ... for this kind"
            raise MergeBenchError(
                f"{PRETRAINED}: transformers has no image classifier for model type "
                f"{config.model_type!r} ({first_line(err)[:120]})"
            ) from None


class TimmImageFamily(HFImageClassificationFamily):
    """timm fine-tunes saved with their `config.json`; images by timm's evaluation transform."""

    # A checkpoint saved from a wrapper module (`model.blocks...`) reads as timm's own keys.
    backbone_prefix = "model"

    def __init__(
        self,
        tasks,
        pretrained_path: Path,
        specs: Mapping[str, DataSpec],
        eval_batch_size: int = 64,
    ) -> None:
        super().__init__(tasks, pretrained_path, specs, eval_batch_size)
        from timm.data import create_transform, resolve_model_data_config

        self.folder = model_folder(pretrained_path)
        with torch.device("meta"):
            probe = self._new_model(1)
        self.transform = create_transform(**resolve_model_data_config(probe), is_training=False)
        heads = probe.pretrained_cfg.get("classifier") or ()
        self._heads_of(probe, [heads] if isinstance(heads, str) else list(heads))

    @classmethod
    def checkpoint_head(cls, spec: DataSpec, path: Path) -> DataSpec:
        option = _finetuned_option(spec.task)
        config = timm_config(path) or {}
        count = config.get("num_classes")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise MergeBenchError(
                f"{option}: {model_folder(path)}/config.json has no head (num_classes={count!r})"
            )
        given = config.get("label_names") or {}
        if isinstance(given, list):
            given = dict(enumerate(given))
        labels = {int(i): str(n) for i, n in given.items()}
        names = tuple(labels.get(i, f"LABEL_{i}") for i in range(count))
        return head_classes(spec, option, count, names)

    def pixels(self, images: list[Any]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["pixel_values"])

    def _new_model(self, num_classes: int) -> nn.Module:
        import timm

        try:
            return timm.create_model(
                f"local-dir:{self.folder}", pretrained=False, num_classes=num_classes
            )
        except Exception as err:  # timm raises RuntimeError, TypeError, KeyError ...
            raise MergeBenchError(
                f"{PRETRAINED}: timm cannot build the model of {self.folder} ({first_line(err)})"
            ) from None


__all__ = [
    "HFImageClassificationFamily",
    "TimmImageFamily",
    "TransformersImageFamily",
    "architecture",
    "timm_config",
]
