"""Run identity: the hash a run is stored under, so that a resumed sweep skips what is stored.

A run is identified by sha256 of the canonical JSON (sorted keys) of its resolved config plus
its row label. The caller names the config keys (dotted paths) that say where and how a run
reports rather than what it computes (`volatile`): runs that differ only in those share a
hash. The store itself knows no config layout; the benchmark hands its keys in
(`mergebench.bench.identity.VOLATILE_KEYS`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from mergebench.report.records import RunRecord
from mergebench.util.errors import MergeBenchError
from mergebench.util.hashing import stable_hash


def jsonable(value: Any) -> Any:
    """Plain JSON types for configs that may hold OmegaConf nodes, paths or tuples."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return jsonable(OmegaConf.to_container(value, resolve=True))
    except ImportError:  # omegaconf is a dependency; this only keeps the store importable alone
        pass
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def canonical_config(config: Mapping[str, Any], *, volatile: Collection[str]) -> dict[str, Any]:
    """The config as plain JSON data without the `volatile` keys (dotted paths)."""
    plain = jsonable(config)
    if not isinstance(plain, dict):
        raise MergeBenchError(f"config: expected a mapping, got {type(config).__name__}")
    return _drop_volatile(plain, "", frozenset(volatile))


def _drop_volatile(node: dict[str, Any], prefix: str, volatile: frozenset[str]) -> dict[str, Any]:
    out = {}
    for key, value in node.items():
        path = prefix + key
        if path in volatile:
            continue
        out[key] = _drop_volatile(value, path + ".", volatile) if isinstance(value, dict) else value
    return out


def config_hash(
    config: Mapping[str, Any], label: str | None = None, *, volatile: Collection[str]
) -> str:
    """sha256 of the canonical JSON of `config` less `volatile`; `label` separates rows that
    share a config (e.g. the `individual` and `pretrained` reference rows of one job)."""
    payload: dict[str, Any] = {"config": canonical_config(config, volatile=volatile)}
    if label is not None:
        payload["label"] = label
    return stable_hash(payload)  # canonical JSON: the same digest as stores written before


def record_hash(record: RunRecord, *, volatile: Collection[str]) -> str:
    """The key a record is stored under: its config, plus its label."""
    return config_hash(record.config, label=record.label, volatile=volatile)
