"""Model families: build a runnable model, encode inputs, heads, and which checkpoint source
gives a family its weights (`zoo`: fine-tuned here from packaged weights; `configured`: hub
ids or paths named in `model.checkpoints`).

`embedded_family(cfg_model, cfg_taskset, seed)` builds a zoo family with its embedded task
data and the labeled accessor; configured families are built by `mergebench.sources`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergebench.data.embedded import get_task, load_splits
from mergebench.families.base import TaskInputs, ZooFamily, task_inputs
from mergebench.families.labeled import LabeledData
from mergebench.util.errors import MergeBenchError, construct


@dataclass(frozen=True)
class FamilySpec:
    target: str  # "module:Class"
    source: str  # "zoo" (fine-tuned here) | "configured" (model.checkpoints: hub ids or paths)


FAMILIES: dict[str, FamilySpec] = {
    "minilm": FamilySpec("mergebench.families.minilm:MiniLMFamily", "zoo"),
    "efficientnet_lite0": FamilySpec(
        "mergebench.families.efficientnet:EfficientNetLite0Family", "zoo"
    ),
    "clip_vit_b32": FamilySpec("mergebench.families.clip:CLIPFamily", "configured"),
    "clip_vit_b16": FamilySpec("mergebench.families.clip:CLIPFamily", "configured"),
    "clip_vit_l14": FamilySpec("mergebench.families.clip:CLIPFamily", "configured"),
    "roberta_base": FamilySpec("mergebench.families.hf_text:RobertaFamily", "configured"),
    "gpt2": FamilySpec("mergebench.families.hf_text:GPT2Family", "configured"),
    "t0_3b_ia3": FamilySpec("mergebench.families.peft_adapters:IA3Family", "configured"),
    "t5_lora": FamilySpec("mergebench.families.peft_adapters:LoRAFamily", "configured"),
    "openclip_vit_b32": FamilySpec("mergebench.families.openclip:OpenCLIPFamily", "configured"),
    "openclip_vit_b16": FamilySpec("mergebench.families.openclip:OpenCLIPFamily", "configured"),
    "openclip_vit_l14": FamilySpec("mergebench.families.openclip:OpenCLIPFamily", "configured"),
    "vit_b16_in21k": FamilySpec("mergebench.families.vit:ViTFamily", "configured"),
}


def family_spec(name: str) -> FamilySpec:
    if name not in FAMILIES:
        raise MergeBenchError(
            f"model.name: unknown family {name!r} (choose from {', '.join(FAMILIES)})"
        )
    return FAMILIES[name]


def family_class(name: str) -> type[ZooFamily]:
    """The family's class, imported on first use (a family pulls in its model library)."""
    module, cls = family_spec(name).target.split(":")
    return getattr(importlib.import_module(module), cls)


def uses_zoo(name: str) -> bool:
    """Whether the family's checkpoints come from the offline zoo (else: model.checkpoints)."""
    return family_spec(name).source == "zoo"


def _get(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise MergeBenchError(f"{where}.{key}: missing")
    return cfg[key]


def check_pairing(cfg_model: Mapping[str, Any], cfg_taskset: Mapping[str, Any]) -> None:
    """A task set is made for one family (text tasks for MiniLM, images for EfficientNet)."""
    family = _get(cfg_model, "name", "model")
    wanted = _get(cfg_taskset, "family", "taskset")
    if family != wanted:
        raise MergeBenchError(
            f"taskset.family: task set {cfg_taskset.get('name')!r} is for model {wanted!r}, "
            f"not {family!r} (pick model={wanted} or another taskset)"
        )
    cls = family_class(family)
    for task in _get(cfg_taskset, "tasks", "taskset"):
        if get_task(task).modality != cls.modality:
            raise MergeBenchError(
                f"taskset.tasks: task {task!r} is {get_task(task).modality}, "
                f"model {family!r} takes {cls.modality}"
            )


def embedded_family(
    cfg_model: Mapping[str, Any], cfg_taskset: Mapping[str, Any], seed: int = 0
) -> tuple[ZooFamily, LabeledData]:
    """A zoo family with its tasks' inputs, and the labeled accessor for the same splits."""
    check_pairing(cfg_model, cfg_taskset)
    examples = _get(cfg_taskset, "examples", "taskset")
    splits = {
        task: load_splits(
            task,
            int(_get(examples, "train", "taskset.examples")),
            int(_get(examples, "validation", "taskset.examples")),
            int(_get(examples, "test", "taskset.examples")),
            int(seed),
        )
        for task in cfg_taskset["tasks"]
    }
    options = dict(cfg_model.get("options") or {})
    family = construct(family_class(cfg_model["name"]), "model.options",
                       {t: task_inputs(s) for t, s in splits.items()}, **options)  # fmt: skip
    return family, LabeledData(family, splits)


__all__ = [
    "FAMILIES",
    "FamilySpec",
    "TaskInputs",
    "ZooFamily",
    "check_pairing",
    "embedded_family",
    "family_class",
    "family_spec",
    "uses_zoo",
]
