"""Where checkpoints come from: the offline zoo, or configured paths and hub ids.

`open_source(cfg)` gives the `CheckpointSource` of a benchmark config; `load_family` and
`load_pool` are the short ways to a family with its labeled data, and to a pool.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergebench.engine.pool import ModelPool
from mergebench.families import embedded_family, family_spec
from mergebench.families.base import ZooFamily
from mergebench.families.labeled import LabeledData
from mergebench.report.records import REFERENCE_ROWS
from mergebench.sources.base import CheckpointSource, PerTaskModels
from mergebench.sources.configured import ConfiguredSource, configured_family, configured_pool
from mergebench.sources.zoo import ZooSource, zoo_pool
from mergebench.util.errors import MergeBenchError


def _source_kind(cfg_model: Mapping[str, Any]) -> str:
    name = cfg_model.get("name")
    if not name:
        raise MergeBenchError("model.name: missing")
    return family_spec(str(name)).source


def open_source(cfg: Mapping[str, Any], progress: bool = True) -> CheckpointSource:
    """The checkpoint source of a benchmark config (`model`, `taskset`, `seed`, `zoo`)."""
    if _source_kind(cfg["model"]) == "zoo":
        return ZooSource(cfg, progress=progress)
    return ConfiguredSource(cfg)


def load_family(
    cfg_model: Mapping[str, Any], cfg_taskset: Mapping[str, Any], seed: int = 0
) -> tuple[ZooFamily, LabeledData]:
    """The family with its tasks' inputs, and the labeled accessor for the same splits."""
    if _source_kind(cfg_model) == "zoo":
        return embedded_family(cfg_model, cfg_taskset, seed)
    return configured_family(cfg_model, cfg_taskset, seed)


def load_pool(
    cfg_model: Mapping[str, Any],
    cfg_taskset: Mapping[str, Any],
    zoo_dir: str | Path | None = None,
    seed: int = 0,
) -> tuple[ModelPool, LabeledData]:
    """A pool over the family's checkpoints (a zoo's must exist: see `ensure_zoo`)."""
    family, data = load_family(cfg_model, cfg_taskset, seed)
    if _source_kind(cfg_model) == "zoo":
        if zoo_dir is None:
            raise MergeBenchError("zoo.dir: a zoo family needs its zoo folder")
        return zoo_pool(cfg_model, cfg_taskset, zoo_dir, family, data), data
    return configured_pool(family, cfg_model, cfg_taskset), data


__all__ = [
    "REFERENCE_ROWS",
    "CheckpointSource",
    "ConfiguredSource",
    "PerTaskModels",
    "ZooSource",
    "configured_pool",
    "load_family",
    "load_pool",
    "open_source",
]
