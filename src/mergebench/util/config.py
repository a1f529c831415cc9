"""Where the Hydra configuration lives, and reading one config group file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mergebench.util.errors import MergeBenchError


def conf_dir() -> Path:
    """`$MERGEBENCH_CONF`, else the `conf/` folder shipped inside the package (package data,
    so a wheel install finds it as well as an editable one)."""
    override = os.environ.get("MERGEBENCH_CONF")
    path = Path(override) if override else Path(str(resources.files("mergebench") / "conf"))
    if not path.is_dir():
        raise MergeBenchError(f"{path}: configuration folder not found (set MERGEBENCH_CONF)")
    return path


def _keys(node: Any) -> list[str]:
    """`${keys:${.data}}`: the keys of a mapping, [] for null (`taskset=local`'s tasks)."""
    return [] if node is None else [str(k) for k in node]


if not OmegaConf.has_resolver("keys"):
    OmegaConf.register_new_resolver("keys", _keys)


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


def compose_config(overrides: Sequence[str], config_name: str = "config") -> DictConfig:
    """The Hydra config of the `mergebench` app with `overrides` (no Hydra run folder)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:  # a bad override: one line
        text = " ".join(str(err).split())
        raise MergeBenchError(f"override: {text[:300]}") from None
