"""Paper experiments that are more than one benchmark run, as jobs over the zoo:

- `fig5`: per method and task, sign conflicts, L2 distance and cosine similarity between
  the model a method serves for the task and the task's fine-tuned model (EMR-Merging
  Fig. 5), plus storage accounting (bytes to serve all tasks vs N separate models);
- `hparam`: hyperparameter selection on the validation split, one leaderboard row per
  method, `<method> (val-tuned)`, stored in the results database.

Both read the same Hydra config as the `mergebench` job (model, taskset, seed, zoo, store)
plus their own section (`analysis:` / `hparam:`), set by `conf/experiment/*.yaml`:
    python -m mergebench.bench.experiments +experiment=fig5_analysis
    python -m mergebench.bench.experiments +experiment=hparam_val model=efficientnet_lite0 taskset=vision
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergebench.api import merge_pool
from mergebench.bench.analysis import StorageReport, TaskWeightStats, storage_report, weight_stats
from mergebench.bench.identity import VOLATILE_KEYS
from mergebench.bench.selection import select_on_validation
from mergebench.evaluation import ModelCache, evaluate_timed
from mergebench.report.plots import plot_storage, plot_weight_stats
from mergebench.report.render import atomic_write
from mergebench.report.store import config_hash, open_store
from mergebench.report.wandb import build_logger, current_sweep_id
from mergebench.sources import load_pool
from mergebench.sources.zoo import ensure_zoo, family_dir
from mergebench.util.config import to_plain
from mergebench.util.errors import MergeBenchError

JOBS = ("fig5", "hparam")


def zoo_pool(cfg: Mapping[str, Any], progress: bool = True):
    """The pool and labeled data of the configured family and task set (zoo built if allowed)."""
    zoo_cfg = cfg.get("zoo") or {}
    if zoo_cfg.get("build_missing", True):
        directory = ensure_zoo(cfg, progress=progress, multitask=False)
    else:
        directory = family_dir(cfg)
    return load_pool(cfg["model"], cfg["taskset"], directory, int(cfg.get("seed", 0)))


def _method_specs(specs: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """`[{name, label?, params?}]` -> [(name, label, params)]."""
    out = []
    for i, spec in enumerate(specs or []):
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise MergeBenchError(f"analysis.methods[{i}]: expected a method name or {{name: ...}}")
        params = dict(spec.get("params") or {})
        out.append((str(spec["name"]), str(spec.get("label") or spec["name"]), params))
    if not out:
        raise MergeBenchError("analysis.methods: list at least one method")
    return out


def run_fig5(cfg: Mapping[str, Any]) -> tuple[list[TaskWeightStats], list[StorageReport], Path]:
    """Weight statistics and storage of every configured method; writes CSV, JSON and PNGs."""
    from rich.console import Console
    from rich.table import Table

    section = cfg.get("analysis") or {}
    progress = bool(cfg.get("progress", True))
    pool, _ = zoo_pool(cfg, progress)
    stats: list[TaskWeightStats] = []
    storage: list[StorageReport] = []
    for name, label, params in _method_specs(section.get("methods")):
        start = time.perf_counter()
        result = merge_pool(
            name, pool, device=str(cfg.get("device", "cpu")), progress=progress, **params
        )
        seconds = time.perf_counter() - start
        stats += weight_stats(result, pool, method=label)
        storage.append(storage_report(result, pool, method=label))
        print(f"[fig5] {label}: merged in {seconds:.1f} s")
        del result

    family, taskset = cfg["model"]["name"], cfg["taskset"]["name"]
    out = Path(section.get("out_dir") or "outputs/analysis")
    stem = f"{family}_{taskset}"
    rows = [s.to_dict() for s in stats]
    buf = _csv(rows)
    atomic_write(out / f"{stem}_weights.csv", buf)
    atomic_write(
        out / f"{stem}_weights.json",
        json.dumps(
            {"family": family, "taskset": taskset, "weights": rows,
             "storage": [r.to_dict() for r in storage]},
            indent=2,
        ) + "\n",
    )  # fmt: skip
    atomic_write(out / f"{stem}_storage.csv", _csv([r.to_dict() for r in storage]))
    plot_weight_stats(stats, out / f"{stem}_fig5.png", title=f"{family} / {taskset}")
    plot_storage(storage, out / f"{stem}_storage.png", title=f"{family} / {taskset}")

    console = Console()
    table = Table(title=f"Fig. 5: merged vs fine-tuned weights, {family}/{taskset}")
    for col in ("method", "task", "sign conflicts %", "L2 distance", "cosine"):
        table.add_column(col, justify="left" if col in ("method", "task") else "right")
    for s in stats:
        table.add_row(s.method, s.task, f"{100 * s.sign_conflicts:.2f}", f"{s.l2_distance:.3f}",
                      f"{s.cosine:.3f}")  # fmt: skip
    console.print(table)
    st = Table(title=f"Storage to serve {len(pool.tasks)} tasks")
    for col in ("method", "serving MB", "separate models MB", "ratio"):
        st.add_column(col, justify="left" if col == "method" else "right")
    for r in storage:
        st.add_row(r.method, f"{r.serving_bytes / 1e6:.1f}", f"{r.separate_bytes / 1e6:.1f}",
                   f"{r.ratio:.3f}")  # fmt: skip
    console.print(st)
    print(f"[fig5] wrote {out}/{stem}_*")
    return stats, storage, out


def _csv(rows: list[dict[str, Any]]) -> str:
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def run_hparam(cfg: Mapping[str, Any]) -> list[int]:
    """Validation-split selection for every method in `hparam.grids`; stores one
    `(val-tuned)` row per method and returns the run ids (skips stored configs unless
    `force=true`)."""
    section = cfg.get("hparam") or {}
    grids = section.get("grids") or {}
    methods = list(section.get("methods") or grids)
    if not methods:
        raise MergeBenchError(
            "hparam.methods: list at least one method (with a grid in hparam.grids)"
        )
    store_cfg = cfg.get("store") or {}
    store_path = store_cfg.get("path")
    target = store_cfg.get("url") or store_path
    store = (
        open_store(
            str(target),
            allow_network_fs=bool(store_cfg.get("allow_network_fs")),
            volatile_keys=VOLATILE_KEYS,
        )
        if target
        else None
    )
    force = bool(cfg.get("force", False))
    progress = bool(cfg.get("progress", True))
    family, taskset = str(cfg["model"]["name"]), str(cfg["taskset"]["name"])
    logger = build_logger(
        cfg.get("logger"), output_dir=Path(store_path).parent if store_path else "outputs"
    )

    device = str(cfg.get("device", "cpu"))
    loaded: dict[str, Any] = {}  # pool, data and model cache, loaded on first need

    def merge_fn(method: str):
        return lambda params: merge_pool(
            method, loaded["pool"], device=device, progress=False, **params
        )

    def evaluate_fn(result: Any, split: str):
        return evaluate_timed(result, loaded["data"], split=split, cache=loaded["cache"]).scores

    run_ids = []
    for method in methods:
        if method not in grids:
            raise MergeBenchError(f"hparam.grids.{method}: no grid given for method {method!r}")
        base = dict((section.get("base_params") or {}).get(method) or {})
        job_cfg = {k: v for k, v in cfg.items() if k not in ("analysis",)}
        job_cfg = {**job_cfg, "method": {"name": method, **base}, "hparam": {"grid": grids[method]}}
        label = f"{method} (val-tuned)"
        key = config_hash(job_cfg, label=label, volatile=VOLATILE_KEYS)
        if store is not None and store.has_run(key) and not force:
            print(f"[hparam] {label}: stored already (force=true re-runs it)")
            continue
        if not loaded:
            loaded["pool"], loaded["data"] = zoo_pool(cfg, progress)
            loaded["cache"] = ModelCache(loaded["data"])  # one model per head shape, reused
        selection = select_on_validation(
            method, grids[method], merge_fn(method), evaluate_fn, base, progress
        )
        record = selection.record(family, taskset, job_cfg)
        print(
            f"[hparam] {label}: picked {selection.best.params} "
            f"(validation avg {selection.best.val_average:.4f})"
        )
        if store is not None:
            run_ids.append(store.add_run(record, config_hash_=key, sweep_id=current_sweep_id()))
        logger.log_run(record, sweep_id=current_sweep_id(), key=key)
    return run_ids


def run(cfg: Any) -> Any:
    """Dispatch on `experiment_job` (set by the experiment presets)."""
    plain = to_plain(cfg)
    job = plain.get("experiment_job")
    if job == "fig5":
        return run_fig5(plain)
    if job == "hparam":
        return run_hparam(plain)
    raise MergeBenchError(
        f"experiment_job: {job!r} is not one of {', '.join(JOBS)} "
        "(use +experiment=fig5_analysis or +experiment=hparam_val)"
    )
