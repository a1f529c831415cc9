"""What the paper settings' families share (CLIP, RoBERTa, GPT-2): configured checkpoints
instead of the embedded zoo, and Hugging Face data sets.

`PaperFamily.from_config(cfg_model, cfg_taskset, seed)` gives the family (label-free, what
methods see) and its `HFLabeledData` (the evaluator's); `family.build_pool(cfg_model,
cfg_taskset)` opens the checkpoints of `model.checkpoints` under the key names of the
family's model. A model config looks like:

    name: gpt2
    checkpoints:
      pretrained: gpt2                  # hub id or local path
      finetuned: {cola: tanganke/gpt2_cola, ...}
    exclude: ['score\\..*']
    options: {...}                      # keyword arguments of the family
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergebench.config import to_plain as _plain
from mergebench.errors import MergeBenchError
from mergebench.models.base import TaskInputs, ZooFamily
from mergebench.models.hub import CanonicalSource, canonical_source, resolve_model
from mergebench.pool import ModelPool
from mergebench.selection import compile_patterns, is_excluded
from mergebench.tasks.hf_datasets import (
    DataSpec,
    Examples,
    HFLabeledData,
    InputRows,
    parse_data_spec,
)
from mergebench.tasks.splits import SPLITS
from mergebench.tensors import open_checkpoint


class PaperFamily(ZooFamily):
    """A family with configured checkpoints (hub ids or paths) and Hugging Face data sets."""

    # What a task set names in `family:` to say it is made for this family.
    kind: str = ""
    # The model's base prefix: checkpoints may store keys with or without it.
    backbone_prefix: str = ""
    # Task-specific keys of the model (always excluded from merging).
    head_patterns: tuple[str, ...] = ()
    # Whether the family, not the checkpoints, supplies the heads (CLIP's zero-shot heads).
    heads_separate: bool = False
    # The zoo does not build these families: their pool comes from `model.checkpoints`.
    configured_checkpoints = True

    def __init__(
        self,
        tasks: dict[str, TaskInputs],
        pretrained_path: Path,
        specs: Mapping[str, DataSpec],
        eval_batch_size: int = 64,
    ) -> None:
        super().__init__(tasks, eval_batch_size)
        self.pretrained_path = pretrained_path
        self.specs = dict(specs)  # where each task's data lives (no labels in there)

    # -- what subclasses provide -------------------------------------------------------------
    @classmethod
    def task_classes(cls, spec: DataSpec) -> tuple[str, ...]:
        """Class names of one task (their number is the head's size)."""
        raise NotImplementedError

    def head_tensors(self, task: str) -> dict[str, torch.Tensor]:
        """Head tensors that the family computes itself (CLIP); the checkpoints' otherwise."""
        return {}

    def pretrained_state(self) -> dict[str, torch.Tensor]:  # the zoo's hook, not ours
        raise MergeBenchError(f"model {self.name!r} has configured checkpoints; it has no zoo")

    # -- construction from the Hydra config ---------------------------------------------------
    @classmethod
    def from_config(
        cls, cfg_model: Mapping[str, Any], cfg_taskset: Mapping[str, Any], seed: int = 0
    ) -> tuple[PaperFamily, HFLabeledData]:
        wanted = cfg_taskset.get("family")
        if wanted not in (cls.kind, cfg_model.get("name")):
            raise MergeBenchError(
                f"taskset.family: task set {cfg_taskset.get('name')!r} is for {wanted!r}, "
                f"not for model {cfg_model.get('name')!r} (a {cls.kind!r} family)"
            )
        tasks = [str(t) for t in (cfg_taskset.get("tasks") or [])]
        if not tasks:
            raise MergeBenchError("taskset.tasks: no tasks")
        data_cfg = _plain(cfg_taskset.get("data")) or {}
        cache_dir = cfg_taskset.get("cache_dir")
        specs = {t: parse_data_spec(t, data_cfg.get(t), cache_dir) for t in tasks}
        examples = Examples.from_config(_plain(cfg_taskset.get("examples")))
        checkpoints = _plain(cfg_model.get("checkpoints")) or {}
        pretrained = resolve_model(checkpoints.get("pretrained"), "model.checkpoints.pretrained")
        inputs = {
            t: TaskInputs(
                num_classes=len(cls.task_classes(spec)),
                inputs={s: InputRows(spec, s, int(seed), examples) for s in SPLITS},
            )
            for t, spec in specs.items()
        }
        options = dict(_plain(cfg_model.get("options")) or {})
        try:
            family = cls(inputs, pretrained, specs=specs, **options)
        except TypeError as err:
            raise MergeBenchError(f"model.options: {err}") from err
        return family, HFLabeledData(family, specs, int(seed), examples)

    def exclude_patterns(self, cfg_model: Mapping[str, Any]) -> list[str]:
        """The configured exclude list, plus this family's heads (never merged)."""
        patterns = [str(p) for p in (_plain(cfg_model.get("exclude")) or [])]
        return patterns + [p for p in self.head_patterns if p not in patterns]

    def model_keys(self, task: str) -> list[str]:
        """The state dict keys of the model for `task`, built without allocating weights."""
        with torch.device("meta"):
            model = self._new_model(self._task(task).num_classes)
        return list(model.state_dict())

    def build_pool(self, cfg_model: Mapping[str, Any], cfg_taskset: Mapping[str, Any]) -> ModelPool:
        """The pool over `model.checkpoints`: pretrained backbone, one model per task."""
        checkpoints = _plain(cfg_model.get("checkpoints")) or {}
        finetuned_cfg = checkpoints.get("finetuned") or {}
        heads = compile_patterns(self.head_patterns)
        first = next(iter(self.tasks))
        backbone = [k for k in self.model_keys(first) if not is_excluded(k, heads)]
        pretrained = canonical_source(
            open_checkpoint(self.pretrained_path, role="pretrained"),
            backbone,
            self.backbone_prefix,
            "model.checkpoints.pretrained",
        )
        finetuned: dict[str, CanonicalSource] = {}
        for task in self.tasks:
            option = f"model.checkpoints.finetuned.{task}"
            if not finetuned_cfg.get(task):
                raise MergeBenchError(
                    f"{option}: no fine-tuned checkpoint configured for task {task!r} "
                    "(a hub id or a local path)"
                )
            path = resolve_model(finetuned_cfg[task], option)
            computed = self.head_tensors(task)
            keys = [k for k in self.model_keys(task) if k not in computed]
            finetuned[task] = canonical_source(
                open_checkpoint(path, role=f"finetuned[{task}]"),
                keys,
                self.backbone_prefix,
                option,
                extra=computed,
            )
        return ModelPool(
            pretrained=pretrained,
            finetuned=finetuned,
            exclude=self.exclude_patterns(cfg_model),
            heads_separate=self.heads_separate,
            family=self,
            name=f"{cfg_model.get('name')}/{cfg_taskset.get('name', 'custom')}",
        )

    def build_model(self, task: str) -> nn.Module:
        model = self._new_model(self._task(task).num_classes)
        heads = self.head_tensors(task)
        if heads:
            model.load_state_dict(heads, strict=False)
        return model


# ------------------------------------------------------------------------------ for the bench


class PoolReferences:
    """The reference rows of a configured pool, with the evaluator's `state_dict(task)`:
    `individual` (each task's fine-tuned model) and `pretrained` (the pretrained backbone
    with the task's own head). There is no multi-task model in these settings."""

    def __init__(self, kind: str, pool: ModelPool) -> None:
        if kind not in ("individual", "pretrained"):
            raise MergeBenchError(
                f"reference row {kind!r}: a paper setting has individual, pretrained"
            )
        self.kind = kind
        self.pool = pool

    def state_dict(self, task: str) -> dict[str, torch.Tensor]:
        own = self.pool.finetuned[task]
        if self.kind == "individual":
            return own.state_dict()
        heads = compile_patterns(self.pool.exclude)
        state = self.pool.pretrained.state_dict()
        state.update({k: own.get(k) for k in own.keys() if is_excluded(k, heads)})
        return state


def _identity(files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def bench_context(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What `mergebench.bench` keeps per task set, for a paper family: family, labeled data,
    evaluation model cache, a folder for cached reference rows, and a signature of the
    checkpoints (their files' paths, sizes and times) and data settings."""
    import hashlib
    import json
    import os

    from mergebench.evaluate import ModelCache
    from mergebench.models import load_family

    cfg_model, cfg_taskset = cfg["model"], cfg["taskset"]
    family, data = load_family(cfg_model, cfg_taskset, int(cfg.get("seed", 0)))
    pool = family.build_pool(cfg_model, cfg_taskset)
    sources = {"pretrained": pool.pretrained, **pool.finetuned}
    files = {name: _identity(src.source.files()) for name, src in sources.items()}
    blob = {"checkpoints": files, "taskset": _plain(cfg_taskset), "seed": cfg.get("seed", 0)}
    signature = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
    env = os.environ.get("MERGEBENCH_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "mergebench"
    return {
        "family": family,
        "data": data,
        "cache": ModelCache(data),
        "dir": base / "paper" / str(cfg_model["name"]),
        "manifest": {"tasks": {}, "multitask": {}},
        "signature": signature,
        "has_multitask": False,
        "references": lambda kind: PoolReferences(kind, pool),
    }


__all__ = ["PaperFamily", "PoolReferences", "bench_context"]
