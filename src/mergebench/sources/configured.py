"""`ConfiguredSource`: the paper settings' checkpoints, hub ids or local paths named in
`model.checkpoints`, opened under the key names of the family's model.

    name: gpt2
    checkpoints:
      pretrained: gpt2                  # hub id or local path
      finetuned: {cola: tanganke/gpt2_cola, ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from mergebench.engine.checkpoints import TensorReader, open_checkpoint
from mergebench.engine.keyplan import check_task_specific, compile_patterns, is_excluded
from mergebench.engine.pool import ModelPool
from mergebench.engine.renamed import CanonicalSource, canonical_source
from mergebench.families import family_class
from mergebench.families.labeled import HFLabeledData
from mergebench.families.paper import PaperFamily
from mergebench.sources.hub import resolve_model
from mergebench.util.config import to_plain
from mergebench.util.errors import MergeBenchError
from mergebench.util.hashing import stable_hash
from mergebench.util.paths import cache_root


def configured_family(
    cfg_model: Mapping[str, Any], cfg_taskset: Mapping[str, Any], seed: int = 0
) -> tuple[PaperFamily, HFLabeledData]:
    """The family of a configured model, built from its resolved pretrained checkpoint."""
    cls = family_class(cfg_model, PaperFamily)
    cls.check_taskset(cfg_model, cfg_taskset)  # a wrong pairing fails before any download
    checkpoints = to_plain(cfg_model.get("checkpoints")) or {}
    pretrained = resolve_model(checkpoints.get("pretrained"), "model.checkpoints.pretrained")
    if not cls.reads_finetuned:
        return cls.from_config(cfg_model, cfg_taskset, int(seed), pretrained)
    # The classes of each task are in its fine-tuned checkpoint's config.
    finetuned_cfg = checkpoints.get("finetuned") or {}
    tasks = [str(t) for t in (cfg_taskset.get("tasks") or [])]
    finetuned = {t: _finetuned_path(finetuned_cfg, t) for t in tasks}
    return cls.from_config(cfg_model, cfg_taskset, int(seed), pretrained, finetuned=finetuned)


@runtime_checkable
class OwnPoolSources(Protocol):
    """A family that opens its pool's readers itself (PEFT adapters: the pretrained side is
    made from the adapters or the base model, each task's side reads its adapter)."""

    def pool_sources(
        self, finetuned: Mapping[str, Path]
    ) -> tuple[TensorReader, dict[str, TensorReader]]:
        """(pretrained reader, one reader per task) from the resolved task checkpoints."""


@runtime_checkable
class OwnReferences(Protocol):
    """Labeled data that builds its own reference rows (lm-eval task sets: the base, each
    expert on every task, each expert on its own tasks)."""

    def reference_kinds(self) -> tuple[str, ...]: ...

    def reference(self, kind: str) -> Any: ...


def _finetuned_path(finetuned_cfg: Mapping[str, Any], task: str) -> Path:
    option = f"model.checkpoints.finetuned.{task}"
    if not finetuned_cfg.get(task):
        raise MergeBenchError(
            f"{option}: no fine-tuned checkpoint configured for task {task!r} "
            "(a hub id or a local path)"
        )
    return resolve_model(finetuned_cfg[task], option)


def _canonical_sources(
    family: PaperFamily, finetuned_cfg: Mapping[str, Any]
) -> tuple[CanonicalSource, dict[str, CanonicalSource]]:
    """The checkpoints opened under the key names of the family's model: the pretrained
    backbone, and per task its model with the heads the family computes itself."""
    heads = compile_patterns(family.head_patterns)
    first = next(iter(family.tasks))
    backbone = [k for k in family.model_keys(first) if not is_excluded(k, heads)]
    pretrained = canonical_source(
        open_checkpoint(family.pretrained_path, role="pretrained"),
        backbone,
        family.backbone_prefix,
        "model.checkpoints.pretrained",
    )
    finetuned: dict[str, CanonicalSource] = {}
    for task in family.tasks:
        path = _finetuned_path(finetuned_cfg, task)
        computed = family.head_tensors(task)
        keys = [k for k in family.model_keys(task) if k not in computed]
        finetuned[task] = canonical_source(
            open_checkpoint(path, role=f"finetuned[{task}]"),
            keys,
            family.backbone_prefix,
            f"model.checkpoints.finetuned.{task}",
            extra=computed,
        )
    return pretrained, finetuned


def configured_pool(
    family: PaperFamily, cfg_model: Mapping[str, Any], cfg_taskset: Mapping[str, Any]
) -> ModelPool:
    """The pool over `model.checkpoints`: pretrained backbone, one model per task (or the
    readers an `OwnPoolSources` family opens from them)."""
    checkpoints = to_plain(cfg_model.get("checkpoints")) or {}
    finetuned_cfg = checkpoints.get("finetuned") or {}
    pretrained: TensorReader
    finetuned: Mapping[str, TensorReader]
    if isinstance(family, OwnPoolSources):
        paths = {task: _finetuned_path(finetuned_cfg, task) for task in family.tasks}
        pretrained, finetuned = family.pool_sources(paths)
    else:
        pretrained, finetuned = _canonical_sources(family, finetuned_cfg)
    return ModelPool(
        pretrained=pretrained,
        finetuned=dict(finetuned),
        exclude=family.exclude_patterns(cfg_model),
        heads_separate=family.heads_separate,
        task_specific=check_task_specific(cfg_model.get("task_specific", "exclude")),
        family=family,
        name=f"{cfg_model.get('name')}/{cfg_taskset.get('name', 'custom')}",
        layer_pattern=cfg_model.get("layer_pattern"),
    )


class PoolReferences:
    """The reference rows of a configured pool, with the evaluator's `state_dict(task)`:
    `individual` (each task's fine-tuned model) and `pretrained` (the pretrained backbone
    with the task's own head; under `task_specific: auto`, with every key of the task's own
    that the pretrained model lacks or holds in another shape). There is no multi-task model
    in these settings."""

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
        if self.pool.task_specific == "auto":  # the task's own where the pretrained differs
            keys = set(own.keys())
            state = {k: v for k, v in state.items() if k in keys}
            state.update({k: own.get(k) for k in keys
                          if k not in state or tuple(state[k].shape) != tuple(own.shape(k))})  # fmt: skip
        return state


def _files(source: TensorReader) -> list[Path]:
    """The files behind a pool reader (a renamed view: its underlying checkpoint's)."""
    return source.source.files() if isinstance(source, CanonicalSource) else source.files()


def _identity(files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


class ConfiguredSource:
    """A `CheckpointSource` over `model.checkpoints` (no zoo, no multi-task model)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg_model, self.cfg_taskset = cfg["model"], cfg["taskset"]
        self.seed = int(cfg.get("seed", 0))
        self.family, self.data = configured_family(self.cfg_model, self.cfg_taskset, self.seed)
        self._pool = configured_pool(self.family, self.cfg_model, self.cfg_taskset)

    def signature(self) -> str:
        sources = {"pretrained": self._pool.pretrained, **self._pool.finetuned}
        files = {name: _identity(_files(src)) for name, src in sources.items()}
        signed: dict[str, Any] = {"checkpoints": files}
        signed.update(taskset=to_plain(self.cfg_taskset), seed=self.seed)
        # Classes named by the data or the checkpoints (string labels -> ids): part of the run.
        own = {t: s.classes for t, s in self.family.specs.items() if s.files}
        if own:
            signed["classes"] = own
        if isinstance(self.family, OwnPoolSources):  # the base model is outside the pool
            signed["base"] = _identity(open_checkpoint(self.family.pretrained_path).files())
        return stable_hash(signed)

    def cache_dir(self) -> Path:
        return cache_root() / "paper" / str(self.cfg_model["name"])

    def pool(self) -> ModelPool:
        return self._pool

    def reference_kinds(self) -> tuple[str, ...]:
        if isinstance(self.data, OwnReferences):
            return self.data.reference_kinds()
        return ("individual", "pretrained")

    def reference(self, kind: str) -> Any:
        if isinstance(self.data, OwnReferences):
            return self.data.reference(kind)
        return PoolReferences(kind, self._pool)


__all__ = [
    "ConfiguredSource",
    "OwnPoolSources",
    "OwnReferences",
    "PoolReferences",
    "configured_family",
    "configured_pool",
]
