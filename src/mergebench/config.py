"""Where the Hydra configuration lives, and reading one config group file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mergebench.errors import MergeBenchError


def conf_dir() -> Path:
    """`$MERGEBENCH_CONF`, else the repository's top-level `conf/` (editable install)."""
    override = os.environ.get("MERGEBENCH_CONF")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "conf"
    if not path.is_dir():
        raise MergeBenchError(f"{path}: configuration folder not found (set MERGEBENCH_CONF)")
    return path


def to_plain(obj: Any) -> Any:
    """OmegaConf containers to plain Python (a no-op for plain data)."""
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def load_group(group: str, name: str) -> dict[str, Any]:
    """The plain dict of `conf/<group>/<name>.yaml`, or a clear error listing the options."""
    path = conf_dir() / group / f"{name}.yaml"
    if not path.is_file():
        raise MergeBenchError(
            f"{group}: unknown {group} {name!r} (choose from {', '.join(group_options(group))})"
        )
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise MergeBenchError(f"{path}: expected a mapping")
    return data
