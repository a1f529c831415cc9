"""Where checkpoints come from: the offline zoo, or configured paths and hub ids.

A model config names its source (`model.source`); `SOURCES` says, per source, how to open
it, build its family and open its pool. `open_source(cfg)` gives the `CheckpointSource` of a
benchmark config; `load_family` and `load_pool` are the short ways to a family with its
labeled data, and to a pool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergebench.engine.pool import ModelPool
from mergebench.families import embedded_family
from mergebench.families.base import Family
from mergebench.families.labeled import LabeledData
from mergebench.report.records import REFERENCE_ROWS
from mergebench.sources.base import CheckpointSource, PerTaskModels
from mergebench.sources.configured import ConfiguredSource, configured_family, configured_pool
from mergebench.sources.zoo import ZooSource, zoo_pool
from mergebench.util.errors import MergeBenchError

Config = Mapping[str, Any]


def _zoo_pool(
    cfg_model: Config, cfg_taskset: Config, zoo_dir: str | Path | None, family: Any, data: Any
) -> ModelPool:
    if zoo_dir is None:
        raise MergeBenchError("zoo.dir: a zoo family needs its zoo folder")
    return zoo_pool(cfg_model, cfg_taskset, zoo_dir, family, data)


def _configured_pool(
    cfg_model: Config, cfg_taskset: Config, zoo_dir: str | Path | None, family: Any, data: Any
) -> ModelPool:
    return configured_pool(family, cfg_model, cfg_taskset)


@dataclass(frozen=True)
class Source:
    """One kind of checkpoint source: its `CheckpointSource`, its family with labeled data,
    and a pool over its checkpoints for an already loaded family."""

    open: Callable[[Config, bool], CheckpointSource]
    family: Callable[[Config, Config, int], tuple[Family, LabeledData]]
    pool: Callable[[Config, Config, str | Path | None, Any, Any], ModelPool]


SOURCES: dict[str, Source] = {
    # fine-tuned here from packaged weights (a ZooFamily; mergebench-zoo builds it)
    "zoo": Source(
        lambda cfg, progress: ZooSource(cfg, progress=progress), embedded_family, _zoo_pool
    ),
    # hub ids or paths named in model.checkpoints (a PaperFamily)
    "configured": Source(
        lambda cfg, progress: ConfiguredSource(cfg), configured_family, _configured_pool
    ),
}


def source_of(cfg_model: Config) -> Source:
    """The source a model config names (`model.source`)."""
    if not cfg_model.get("name"):
        raise MergeBenchError("model.name: missing")
    kind = cfg_model.get("source")
    if kind is None:
        raise MergeBenchError(f"model.source: missing (choose from {', '.join(SOURCES)})")
    if kind not in SOURCES:
        raise MergeBenchError(f"model.source: {kind!r} (choose from {', '.join(SOURCES)})")
    return SOURCES[str(kind)]


def open_source(cfg: Config, progress: bool = True) -> CheckpointSource:
    """The checkpoint source of a benchmark config (`model`, `taskset`, `seed`, `zoo`)."""
    return source_of(cfg["model"]).open(cfg, progress)


def load_family(
    cfg_model: Config, cfg_taskset: Config, seed: int = 0
) -> tuple[Family, LabeledData]:
    """The family with its tasks' inputs, and the labeled accessor for the same splits."""
    return source_of(cfg_model).family(cfg_model, cfg_taskset, seed)


def load_pool(
    cfg_model: Config,
    cfg_taskset: Config,
    zoo_dir: str | Path | None = None,
    seed: int = 0,
) -> tuple[ModelPool, LabeledData]:
    """A pool over the family's checkpoints (a zoo's must exist: see `ensure_zoo`)."""
    source = source_of(cfg_model)
    family, data = source.family(cfg_model, cfg_taskset, seed)
    return source.pool(cfg_model, cfg_taskset, zoo_dir, family, data), data


__all__ = [
    "REFERENCE_ROWS",
    "SOURCES",
    "CheckpointSource",
    "ConfiguredSource",
    "PerTaskModels",
    "Source",
    "ZooSource",
    "configured_pool",
    "load_family",
    "load_pool",
    "open_source",
    "source_of",
]
