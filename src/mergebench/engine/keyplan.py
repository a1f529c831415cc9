"""Which keys are merged, copied from the pretrained model, or kept per task (methods.md).

- merged: floating-point tensors of the pretrained model present with the same shape in
  every fine-tuned model and not matched by an `exclude` regex;
- copied: non-floating tensors (e.g. `position_ids`), taken from the pretrained model and
  required to be equal in every model;
- task-specific: keys matched by `exclude` (task heads): each task keeps its own.

`task_specific: auto` (the official BEiT-3 merge's rule, for heterogeneous pools) also makes
task-specific every key that some model lacks or whose shape differs across the pool
(heads, position tables of other resolutions): each task keeps its own tensor, if it has
one, and the plan says which keys and why (`KeyPlan.auto`). The default, `exclude`, treats
such a key as an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from mergebench.engine.keymatch import (
    compile_patterns,
    describe_mismatch,
    is_excluded,
    key_difference,
)
from mergebench.engine.pool import ModelPool
from mergebench.util.errors import MergeBenchError

TASK_SPECIFIC_MODES = ("exclude", "auto")


def check_task_specific(value: object) -> str:
    """The `task_specific` option: `exclude` (only the keys `exclude` names) or `auto`."""
    if not isinstance(value, str) or value not in TASK_SPECIFIC_MODES:
        raise MergeBenchError(f"task_specific: {value!r} is not one of {list(TASK_SPECIFIC_MODES)}")
    return value


@dataclass
class KeyPlan:
    merged: list[str]
    copied: list[str]
    task_specific: dict[str, list[str]]
    pretrained_excluded: list[str] = field(default_factory=list)
    # task_specific=auto: {key: why it is task-specific}, in key order.
    auto: dict[str, str] = field(default_factory=dict)


def plan_keys(pool: ModelPool) -> KeyPlan:
    """Classify every key of the pool, or raise naming the first offending key."""
    patterns = compile_patterns(pool.exclude)
    pre = pool.pretrained
    merged: list[str] = []
    copied: list[str] = []
    pre_excluded: list[str] = []
    auto: dict[str, str] = {}
    if check_task_specific(pool.task_specific) == "auto":
        auto = heterogeneous_keys(pool, patterns)
    else:
        _check_same_keys(pool, patterns)
    for key in pre.keys():
        if is_excluded(key, patterns):
            pre_excluded.append(key)
            continue
        if key in auto:
            continue
        for ft in pool.finetuned.values():
            if ft.shape(key) != pre.shape(key):
                raise MergeBenchError(
                    f"key {key!r}: shape {list(ft.shape(key))} in {ft.name} "
                    f"but {list(pre.shape(key))} in {pre.name}"
                )
        if pre.dtype(key).is_floating_point:
            merged.append(key)
        else:
            _check_equal_integers(pool, key)
            copied.append(key)

    heads = {
        task: [k for k in ft.keys() if is_excluded(k, patterns)]
        for task, ft in pool.finetuned.items()
    }
    if not pool.heads_separate:
        expected = set(pre_excluded).union(*heads.values())
        for task, keys in heads.items():
            missing = sorted(expected - set(keys))
            if missing:
                raise MergeBenchError(
                    f"{pool.finetuned[task].name}: task-specific key {missing[0]!r} is missing "
                    f"(task {task!r} must supply its own head)"
                )
    task_specific = {
        task: [k for k in ft.keys() if is_excluded(k, patterns) or k in auto]
        for task, ft in pool.finetuned.items()
    }
    _check_patterns_match(pool, patterns)
    if not merged:
        raise MergeBenchError(
            f"{pre.name}: no floating-point tensors left to merge (check the exclude patterns)"
        )
    return KeyPlan(merged, copied, task_specific, pre_excluded, auto)


def heterogeneous_keys(pool: ModelPool, patterns: list[re.Pattern[str]]) -> dict[str, str]:
    """The keys (not excluded) that some model of the pool lacks, or whose shape differs
    between models, each with the reason, in key order (pretrained keys first)."""
    pre = pool.pretrained
    models = {"pretrained": pre, **pool.finetuned}
    keys = dict.fromkeys(pre.keys())
    for ft in pool.finetuned.values():
        keys.update(dict.fromkeys(ft.keys()))
    held = {name: set(model.keys()) for name, model in models.items()}
    reasons: dict[str, str] = {}
    for key in keys:
        if is_excluded(key, patterns):
            continue
        lacking = [name for name in models if key not in held[name]]
        if lacking:
            reasons[key] = f"missing in {', '.join(lacking)}"
            continue
        shapes = {name: list(model.shape(key)) for name, model in models.items()}
        if len({tuple(shape) for shape in shapes.values()}) > 1:
            reasons[key] = "shapes differ: " + ", ".join(
                f"{shape} in {name}" for name, shape in shapes.items()
            )
    return reasons


def _check_same_keys(pool: ModelPool, patterns: list[re.Pattern[str]]) -> None:
    """Every fine-tuned model has the pretrained keys that are not excluded, and no others:
    else say what differs (a prefix, a head, or counts and examples of both sides)."""
    pre = pool.pretrained
    for task, ft in pool.finetuned.items():
        missing, extra = key_difference(pre.keys(), ft.keys(), patterns)
        if missing or extra:
            raise MergeBenchError(
                describe_mismatch(ft.name, pre.name, task, pre.keys(), ft.keys(), patterns)
            )


def _check_patterns_match(pool: ModelPool, patterns: list[re.Pattern[str]]) -> None:
    """A pattern that matches no key is a mistake (`classifier` alone, without `\\..*`,
    would silently merge every head): name it."""
    keys = set(pool.pretrained.keys()).union(*(ft.keys() for ft in pool.finetuned.values()))
    for pattern in patterns:
        if not any(pattern.fullmatch(k) for k in keys):
            raise MergeBenchError(
                f"exclude: pattern {pattern.pattern!r} matches no key (patterns match whole "
                f"keys, e.g. {pattern.pattern + chr(92) + '..*'!r}; first keys: "
                f"{', '.join(sorted(keys)[:3])})"
            )


def _check_equal_integers(pool: ModelPool, key: str) -> None:
    reference = pool.pretrained.get(key)
    for ft in pool.finetuned.values():
        if not torch.equal(ft.get(key), reference):
            raise MergeBenchError(
                f"key {key!r}: non-floating tensor differs between {ft.name} and "
                f"{pool.pretrained.name} (it is copied, so it must be equal)"
            )
