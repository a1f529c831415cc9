"""`mergebench-merge`: merge local checkpoints and save the artifact (a Hydra app)."""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from mergebench.api import merge
from mergebench.cli.common import (
    check_top_level_keys,
    fail,
    hydra_overrides,
    method_params,
    no_run_folder_on_failure,
    require_values,
    run_hydra_app,
)
from mergebench.methods.mergekit_recipes import load_recipe, to_recipe, write_recipe
from mergebench.methods.registry import method_names
from mergebench.results import artifact_bytes, parse_size
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError

CONF = str(conf_dir())
PROGRAM = "mergebench-merge"
KEYS = (
    "method",
    "pretrained",
    "finetuned",
    "exclude",
    "heads_separate",
    "task_specific",
    "output_dir",
    "shard_size",
    "vocab",
    "out_dtype",
    "device",
    "progress",
    "key_map",
    "strip_prefix",
    "mergekit",
    "mergekit_out",
)


def _flag(cfg: DictConfig, key: str) -> bool:
    value = cfg[key]
    if not isinstance(value, bool):
        raise MergeBenchError(f"{key}: {value!r} is not true/false")
    return value


def _shard_size(cfg: DictConfig) -> int:
    value = cfg.get("shard_size", "4GB")
    if isinstance(value, DictConfig | ListConfig):
        raise MergeBenchError(f"shard_size: expected a size like 2GB, got {value!r}")
    return parse_size(value, "shard_size")


def _scalar(cfg: DictConfig, key: str, default: str | None) -> str | None:
    value = cfg.get(key, default)
    if isinstance(value, DictConfig | ListConfig | bool):
        raise MergeBenchError(f"{key}: expected a name, got {value!r}")
    return None if value is None else str(value)


def _path(cfg: DictConfig, key: str) -> str:
    value = cfg[key]
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float) or not str(value):
        raise MergeBenchError(f"{key}: expected a path, got {value!r}")
    return str(value)


def _plain(value: object) -> object:
    """A config value as plain Python (the API checks it)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


@hydra.main(version_base=None, config_path=CONF, config_name="merge")
def _merge_app(cfg: DictConfig) -> None:
    with no_run_folder_on_failure():
        _merge(cfg)


def _checkpoints(cfg: DictConfig) -> tuple[str, dict, str, dict[str, str], str | None]:
    """Method, options, pretrained, {task: path}, out_dtype: from the command line, or from
    the mergekit recipe `mergekit=recipe.yml`."""
    out_dtype = _scalar(cfg, "out_dtype", None)
    recipe = _scalar(cfg, "mergekit", None)
    if recipe is not None:
        for key in ("pretrained", "finetuned"):
            if not OmegaConf.is_missing(cfg, key):
                raise MergeBenchError(f"{key}: given with mergekit=; the recipe names the models")
        if any(o.split("=")[0].lstrip("+~").startswith("method") for o in hydra_overrides()):
            raise MergeBenchError("method: given with mergekit=; the recipe names the method")
        run = load_recipe(recipe)
        out_dtype = out_dtype if out_dtype is not None else run.out_dtype
        return run.method, run.params, run.pretrained, run.finetuned, out_dtype
    require_values(cfg, ("pretrained", "finetuned"))
    name, params = method_params(cfg.method)
    if not isinstance(cfg.finetuned, DictConfig) or not cfg.finetuned:
        raise MergeBenchError(
            f"finetuned: expected a mapping {{task: path}}, e.g. "
            f"'finetuned={{a: a.safetensors, b: b.safetensors}}', got {cfg.finetuned!r}"
        )
    finetuned = OmegaConf.to_container(cfg.finetuned, resolve=True)
    assert isinstance(finetuned, dict)
    for task, path in finetuned.items():
        if not isinstance(path, str | int | float) or isinstance(path, bool):
            raise MergeBenchError(f"finetuned.{task}: expected a path, got {path!r}")
    paths = {str(t): str(p) for t, p in finetuned.items()}
    return name, params, _path(cfg, "pretrained"), paths, out_dtype


def _merge(cfg: DictConfig) -> None:
    try:
        check_top_level_keys(cfg, known=KEYS)
        name, params, pretrained, finetuned, out_dtype = _checkpoints(cfg)
        require_values(cfg, ("output_dir",))
        recipe_out = _scalar(cfg, "mergekit_out", None)
        # Refused before any work: nothing is written for a method mergekit lacks.
        recipe = to_recipe(name, params, pretrained, finetuned, out_dtype) if recipe_out else None
        exclude = cfg.exclude
        if isinstance(exclude, ListConfig):
            exclude = OmegaConf.to_container(exclude, resolve=True)
        key_map, strip_prefix = (_plain(cfg.get(k)) for k in ("key_map", "strip_prefix"))
        out = _path(cfg, "output_dir")
        start = time.perf_counter()
        result = merge(
            name,
            pretrained=pretrained,
            finetuned=finetuned,
            exclude=exclude if exclude is not None else [],
            heads_separate=_flag(cfg, "heads_separate"),
            device=str(cfg.device),
            progress=_flag(cfg, "progress"),
            output_dir=out,
            shard_size=_shard_size(cfg),
            vocab=_scalar(cfg, "vocab", "base"),
            out_dtype=out_dtype,
            key_map=key_map,
            strip_prefix=strip_prefix,
            task_specific=_scalar(cfg, "task_specific", "exclude") or "exclude",
            **params,
        )
        merged_s = time.perf_counter() - start
        if recipe is not None and recipe_out is not None:
            write_recipe(recipe, recipe_out)
    except MergeBenchError as err:
        fail(PROGRAM, str(err))
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
    # `--help` lists the methods (the only config group this command reads).
    OmegaConf.register_new_resolver(
        "mergebench_methods", lambda: ", ".join(method_names()), replace=True
    )
    run_hydra_app(_merge_app, PROGRAM)


if __name__ == "__main__":
    main()
