"""`mergebench-merge`: merge local checkpoints and save the artifact (a Hydra app)."""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from mergebench.api import merge
from mergebench.cli.common import fail, method_params, require_values, run_hydra_app
from mergebench.results import artifact_bytes
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError

CONF = str(conf_dir())


@hydra.main(version_base=None, config_path=CONF, config_name="merge")
def _merge_app(cfg: DictConfig) -> None:
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


def main() -> None:
    run_hydra_app(_merge_app)
