"""What every entry point shares: a user error is one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from mergebench.util.errors import MergeBenchError


def fail(program: str, message: str) -> NoReturn:
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_hydra_app(app: Callable[[], Any]) -> None:
    """Run a Hydra app; Hydra's own errors (bad override, missing value) exit 1: make them 2."""
    try:
        app()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            sys.exit(2)
        raise


def method_params(method_cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    params = OmegaConf.to_container(method_cfg, resolve=True)
    assert isinstance(params, dict)
    return str(params.pop("name")), params


def require_values(cfg: DictConfig, keys: tuple[str, ...]) -> None:
    """Fail before any work when a mandatory (`???`) value was not given."""
    for key in keys:
        if OmegaConf.is_missing(cfg, key):
            raise MergeBenchError(f"{key}: missing value (add {key}=... to the command line)")
