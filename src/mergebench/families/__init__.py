"""Model families: build a runnable model, encode inputs, heads.

A model config (`conf/model/<name>.yaml`) names its family class and where its checkpoints
come from, so a new model size is a YAML file and a family of one's own needs no edit here:

    name: minilm
    _target_: mergebench.families.minilm.MiniLMFamily   # any importable Family subclass
    source: zoo       # zoo: fine-tuned here (a ZooFamily); configured: model.checkpoints

`family_class(cfg_model)` imports the class; a task set's `family:` names the family *kind*
it is made for (`Family.kind`: `minilm`, `clip`, `glue`, ...), checked by `check_pairing`.
`embedded_family(cfg_model, cfg_taskset, seed)` builds a zoo family with its embedded task
data and the labeled accessor; configured families are built by `mergebench.sources`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, TypeVar

from mergebench.data.embedded import get_task, load_splits
from mergebench.families.base import Family, TaskInputs, ZooFamily, task_inputs
from mergebench.families.labeled import LabeledData
from mergebench.util.errors import MergeBenchError, construct, first_line

EXAMPLE_TARGET = "mergebench.families.minilm.MiniLMFamily"
F = TypeVar("F", bound=Family)


def family_class(cfg_model: Mapping[str, Any], base: type[F] = Family) -> type[F]:  # type: ignore[assignment]
    """The class named by `model._target_` (`package.module.Class`), imported on first use (a
    family pulls in its model library); it must derive from `base` (what `model.source`
    builds: a `ZooFamily` for the zoo, a `PaperFamily` for configured checkpoints)."""
    target = cfg_model.get("_target_")
    if not target:
        raise MergeBenchError(f"model._target_: missing (the family class, e.g. {EXAMPLE_TARGET})")
    module, _, name = str(target).rpartition(".")
    if not module:
        raise MergeBenchError(
            f"model._target_: {target!r} is not a module.Class path (e.g. {EXAMPLE_TARGET})"
        )
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise MergeBenchError(
            f"model._target_: cannot import {target!r}: {first_line(err)}"
        ) from None
    except AttributeError:
        raise MergeBenchError(f"model._target_: module {module!r} has no {name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise MergeBenchError(
            f"model._target_: {target!r} is not a model family "
            "(a subclass of mergebench.families.base.Family)"
        )
    if not issubclass(cls, base):
        raise MergeBenchError(
            f"model._target_: {target!r} is not a {base.__name__} "
            f"(what model.source={cfg_model.get('source')} takes)"
        )
    return cls


def _get(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise MergeBenchError(f"{where}.{key}: missing")
    return cfg[key]


def check_pairing(cfg_model: Mapping[str, Any], cfg_taskset: Mapping[str, Any]) -> None:
    """A task set of embedded data is made for one family kind (text tasks for MiniLM, images
    for EfficientNet), and its tasks' inputs must be what the family takes."""
    _get(cfg_model, "name", "model")
    cls = family_class(cfg_model, ZooFamily)
    cls.check_taskset(cfg_model, cfg_taskset)
    for task in _get(cfg_taskset, "tasks", "taskset"):
        if get_task(task).modality != cls.modality:
            raise MergeBenchError(
                f"taskset.tasks: task {task!r} is {get_task(task).modality}, "
                f"model {cfg_model['name']!r} takes {cls.modality}"
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
    family = construct(family_class(cfg_model, ZooFamily), "model.options",
                       {t: task_inputs(s) for t, s in splits.items()}, **options)  # fmt: skip
    return family, LabeledData(family, splits)


__all__ = [
    "Family",
    "TaskInputs",
    "ZooFamily",
    "check_pairing",
    "embedded_family",
    "family_class",
]
