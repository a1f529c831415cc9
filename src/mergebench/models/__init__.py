"""Model families of the embedded offline zoo and the pool built from a configured family.

`load_family(cfg_model, cfg_taskset, seed)` gives the family (label-free, what methods see)
and the `LabeledData` accessor (zoo trainer and evaluator only).
`load_pool(cfg_model, cfg_taskset, zoo_dir, seed)` adds the zoo's checkpoints: a `ModelPool`
ready for any method, data-dependent ones included.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergebench.errors import MergeBenchError
from mergebench.models.base import HEAD, LabeledData, TaskInputs, ZooFamily, task_inputs
from mergebench.pool import ModelPool
from mergebench.tasks import get_task, load_splits

FAMILIES: dict[str, str] = {
    "minilm": "mergebench.models.minilm:MiniLMFamily",
    "efficientnet_lite0": "mergebench.models.efficientnet:EfficientNetLite0Family",
    # Paper settings: checkpoints from model.checkpoints (hub ids or paths), not the zoo.
    "clip_vit_b32": "mergebench.models.clip:CLIPFamily",
    "clip_vit_b16": "mergebench.models.clip:CLIPFamily",
    "clip_vit_l14": "mergebench.models.clip:CLIPFamily",
    "roberta_base": "mergebench.models.hf_text:RobertaFamily",
    "gpt2": "mergebench.models.hf_text:GPT2Family",
}


def family_class(name: str) -> type[ZooFamily]:
    import importlib

    if name not in FAMILIES:
        raise MergeBenchError(
            f"model.name: unknown family {name!r} (choose from {', '.join(FAMILIES)})"
        )
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def uses_zoo(name: str) -> bool:
    """False for the paper families, whose pool comes from configured checkpoints."""
    return not getattr(family_class(name), "configured_checkpoints", False)


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


def load_family(
    cfg_model: Mapping[str, Any], cfg_taskset: Mapping[str, Any], seed: int = 0
) -> tuple[ZooFamily, LabeledData]:
    """The family with its tasks' inputs, and the labeled accessor for the same splits."""
    if not uses_zoo(_get(cfg_model, "name", "model")):
        return family_class(cfg_model["name"]).from_config(cfg_model, cfg_taskset, seed)
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
    try:
        family = family_class(cfg_model["name"])(
            {t: task_inputs(s) for t, s in splits.items()}, **options
        )
    except TypeError as err:
        raise MergeBenchError(f"model.options: {err}") from err
    return family, LabeledData(family, splits)


def load_pool(
    cfg_model: Mapping[str, Any],
    cfg_taskset: Mapping[str, Any],
    zoo_dir: str | Path,
    seed: int = 0,
) -> tuple[ModelPool, LabeledData]:
    """A pool over the zoo's checkpoints (which must exist: see `mergebench.zoo.ensure_zoo`)."""
    family, data = load_family(cfg_model, cfg_taskset, seed)
    return zoo_pool(cfg_model, cfg_taskset, zoo_dir, family, data), data


def zoo_pool(
    cfg_model: Mapping[str, Any],
    cfg_taskset: Mapping[str, Any],
    zoo_dir: str | Path,
    family: ZooFamily,
    data: LabeledData,
) -> ModelPool:
    """The pool of an already loaded family (a multirun reuses family and data across jobs).
    A paper family's pool comes from its configured checkpoints (`zoo_dir` is not used)."""
    if not uses_zoo(cfg_model["name"]):
        return family.build_pool(cfg_model, cfg_taskset)
    zoo_dir = Path(zoo_dir)
    paths = [zoo_dir / "pretrained.safetensors"] + [
        zoo_dir / f"{t}.safetensors" for t in data.tasks
    ]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MergeBenchError(
            f"{missing[0]}: zoo checkpoint missing (build it with mergebench-zoo)"
        )
    return ModelPool.from_checkpoints(
        zoo_dir / "pretrained.safetensors",
        {t: zoo_dir / f"{t}.safetensors" for t in data.tasks},
        exclude=list(cfg_model.get("exclude") or [rf"{HEAD}\..*"]),
        family=family,
        name=f"{cfg_model['name']}/{cfg_taskset.get('name', 'custom')}",
    )


__all__ = [
    "FAMILIES",
    "LabeledData",
    "TaskInputs",
    "ZooFamily",
    "check_pairing",
    "family_class",
    "load_family",
    "load_pool",
    "uses_zoo",
    "zoo_pool",
]
