"""Command-line entry points. Every user error ends as one line on stderr and exit code 2."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mergebench.config import conf_dir
from mergebench.errors import MergeBenchError

CONF = str(conf_dir())


def fail(program: str, message: str) -> None:
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


@hydra.main(version_base=None, config_path=CONF, config_name="merge")
def _merge_app(cfg: DictConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from mergebench.api import merge
    from mergebench.results import artifact_bytes

    try:
        require_values(cfg, ("pretrained", "finetuned", "output_dir"))
        name, params = method_params(cfg.method)
        finetuned = OmegaConf.to_container(cfg.finetuned, resolve=True)
        if not isinstance(finetuned, dict) or not finetuned:
            raise MergeBenchError("finetuned: expected a mapping {task: path}")
        start = time.perf_counter()
        result = merge(
            name,
            pretrained=str(cfg.pretrained),
            finetuned={str(t): str(p) for t, p in finetuned.items()},
            exclude=list(cfg.exclude),
            heads_separate=bool(cfg.heads_separate),
            device=str(cfg.device),
            progress=bool(cfg.progress),
            **params,
        )
        merged_s = time.perf_counter() - start
        out = result.save(str(cfg.output_dir))
    except MergeBenchError as err:
        fail("mergebench-merge", str(err))
        return
    table = Table(title=f"{name}: {len(result.tasks)} tasks -> {out}")
    table.add_column("task")
    table.add_column("rescaler", justify="right")
    rescalers = getattr(result, "rescalers", {})
    for task in result.tasks:
        table.add_row(task, f"{rescalers[task]:.4f}" if task in rescalers else "-")
    console = Console()
    console.print(table)
    console.print(f"merged in {merged_s:.1f} s; artifact {artifact_bytes(out) / 1e6:.1f} MB")


def merge_main() -> None:
    run_hydra_app(_merge_app)
