"""`mergebench`: the Hydra app that runs one method on one family and task set of the offline
zoo, evaluates every task with the common evaluator, stores the run, and prints its scores
beside the reference rows (individual, multitask, pretrained).

    mergebench                                        # EMR on the text set (MiniLM)
    mergebench method=ties model=efficientnet_lite0 taskset=vision
    mergebench -m +variant=glob(*) +experiment=bench_text,bench_vision   # what `make bench` runs

In a multirun (the basic launcher runs jobs one after another in this process) the family,
its data and the evaluation models are loaded once per task set and reused.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from mergebench.config import conf_dir  # noqa: E402
from mergebench.errors import MergeBenchError  # noqa: E402
from mergebench.records import RunRecord, TaskScore  # noqa: E402

REFERENCE_ROWS = ("individual", "multitask", "pretrained")


# ---------------------------------------------------------------------------- labels


def default_label(method: str, params: Mapping[str, Any]) -> str:
    """Leaderboard row name of a method variant, e.g. `dare (ties)`, `ties w/ M&R`,
    `emr (elect+mask)` (the names the published table knows)."""
    if method == "emr":
        if not params.get("elect", True):
            return (
                "emr (mean)"
                if params.get("mask", True) or params.get("rescale", True)
                else "emr (mean only)"
            )
        mask, rescale = params.get("mask", True), params.get("rescale", True)
        if mask and rescale:
            return (
                "emr"
                if params.get("rescaler", "tensor_mean") == "tensor_mean"
                else f"emr ({params['rescaler']})"
            )
        return {(False, False): "emr (elect)", (True, False): "emr (elect+mask)",
                (False, True): "emr (elect+rescale)"}[(bool(mask), bool(rescale))]  # fmt: skip
    if method == "mask_rescale":
        return f"{params.get('base', '?')} w/ M&R"
    if method == "dare":
        return f"dare ({params.get('base', '?')})"
    return method


# ---------------------------------------------------------------------------- measuring


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 5 ms from
    /proc (ru_maxrss would report the largest value since the process started, which in a
    multirun is an earlier job's)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: the process-lifetime peak is the best we have
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


# ---------------------------------------------------------------------------- context


_CONTEXTS: dict[str, Any] = {}


def _context(cfg: Mapping[str, Any], progress: bool) -> dict[str, Any]:
    """Family, labeled data, evaluation model cache and zoo folder for this task set (built
    once per process; the zoo is built or refreshed first when allowed)."""
    from mergebench.evaluate import ModelCache
    from mergebench.models import check_pairing, load_family, uses_zoo
    from mergebench.zoo import _hash, ensure_zoo, family_dir, read_manifest

    key = _hash([cfg["model"], cfg["taskset"], cfg.get("seed", 0), cfg.get("zoo")])
    if key in _CONTEXTS:
        return _CONTEXTS[key]
    if not uses_zoo(str(cfg["model"]["name"])):  # paper settings: configured checkpoints
        from mergebench.models.paper import bench_context

        _CONTEXTS[key] = bench_context(cfg)
        return _CONTEXTS[key]
    check_pairing(cfg["model"], cfg["taskset"])
    zoo = cfg.get("zoo") or {}
    directory = family_dir(cfg)
    if zoo.get("build_missing", True):
        ensure_zoo(cfg, progress=progress)
    family, data = load_family(cfg["model"], cfg["taskset"], int(cfg.get("seed", 0)))
    manifest = read_manifest(directory)
    taskset = str(cfg["taskset"]["name"])
    missing = [t for t in data.tasks if t not in manifest["tasks"]]
    if missing:
        raise MergeBenchError(
            f"zoo.dir: no fine-tuned {missing[0]!r} in {directory} "
            "(run mergebench-zoo, or set zoo.build_missing=true)"
        )
    signature = _hash(
        {
            "tasks": {t: manifest["tasks"][t]["signature"] for t in data.tasks},
            "multitask": manifest["multitask"].get(taskset, {}).get("signature"),
        }
    )
    _CONTEXTS[key] = {
        "family": family,
        "data": data,
        "cache": ModelCache(data),
        "dir": directory,
        "manifest": manifest,
        "signature": signature,
        "has_multitask": taskset in manifest["multitask"],
    }
    return _CONTEXTS[key]


# ---------------------------------------------------------------------------- reference rows


def reference_records(
    cfg: Mapping[str, Any], ctx: Mapping[str, Any], progress: bool
) -> list[RunRecord]:
    """individual / multitask / pretrained rows, evaluated once per zoo and cached in
    `<zoo>/references/<taskset>.json` (keyed by the zoo's signature and the split)."""
    import json

    from mergebench.evaluate import evaluate_timed
    from mergebench.zoo import ZooModels

    taskset = str(cfg["taskset"]["name"])
    split = str(cfg["eval"]["split"])
    path = Path(ctx["dir"]) / "references" / f"{taskset}.json"
    wanted = {"signature": ctx["signature"], "split": split, "tasks": ctx["data"].tasks}
    cached: dict[str, Any] = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text())
        except json.JSONDecodeError:
            cached = {}
    if {k: cached.get(k) for k in wanted} != wanted:
        cached = {**wanted, "rows": {}}
    kinds = [k for k in REFERENCE_ROWS if k != "multitask" or ctx["has_multitask"]]
    for kind in kinds:
        if kind in cached["rows"]:
            continue
        if "references" in ctx:  # a paper setting's pool
            models = ctx["references"](kind)
        else:
            models = ZooModels(kind, ctx["dir"], ctx["data"].tasks, taskset)
        ev = evaluate_timed(models, ctx["data"], split=split, batch_size=cfg["eval"].get("batch_size"),
                            cache=ctx["cache"], progress=progress)  # fmt: skip
        cached["rows"][kind] = {
            "scores": [asdict(s) for s in ev.scores],
            "eval_seconds": ev.seconds,
            "examples_per_second": ev.examples_per_second,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        os.replace(tmp, path)
    records = []
    for kind in kinds:
        row = cached["rows"][kind]
        records.append(
            RunRecord(
                method=kind,
                label=kind,
                family=str(cfg["model"]["name"]),
                taskset=taskset,
                config=_reference_config(cfg, ctx, kind),
                scores=[TaskScore(**s) for s in row["scores"]],
                eval_seconds=row["eval_seconds"],
                extra={"examples_per_second": row["examples_per_second"], "zoo": str(ctx["dir"])},
            )
        )
    return records


def _reference_config(cfg: Mapping[str, Any], ctx: Mapping[str, Any], kind: str) -> dict[str, Any]:
    return {
        "reference": kind,
        "model": cfg["model"],
        "taskset": cfg["taskset"],
        "seed": cfg.get("seed", 0),
        "eval": {"split": cfg["eval"]["split"]},
        "zoo_signature": ctx["signature"],
    }


# ---------------------------------------------------------------------------- one run


def run(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Merge, evaluate, store and print one method on one task set; returns a summary."""
    from mergebench.api import merge_pool
    from mergebench.evaluate import evaluate_timed
    from mergebench.loggers import current_sweep_id, log_with_leaderboard, logger_from_config
    from mergebench.models import zoo_pool
    from mergebench.results import artifact_bytes

    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    plain.pop("hydra", None)
    progress = bool(plain.get("progress", True))
    from mergebench.zoo import set_threads

    set_threads(plain.get("threads"))
    ctx = _context(plain, progress)
    method_cfg = dict(plain["method"])
    name = str(method_cfg.pop("name"))
    label = plain.get("label") or default_label(name, method_cfg)
    family, taskset = str(plain["model"]["name"]), str(plain["taskset"]["name"])
    config = {**plain, "zoo_signature": ctx["signature"]}

    store = _open_store(plain)
    logger = logger_from_config(plain)  # a bad logger option fails before any work
    if store is not None and not plain.get("force", False):
        from mergebench.store import record_hash

        probe = RunRecord(
            method=name, label=label, family=family, taskset=taskset, config=config, scores=[]
        )
        if store.has_run(record_hash(probe)):
            print(f"{label} on {family}/{taskset}: already in {plain['store']['path']} "
                  "(force=true to run again)", file=sys.stderr)  # fmt: skip
            return {"label": label, "skipped": True}

    references = reference_records(plain, ctx, progress) if plain.get("references", True) else []
    pool = zoo_pool(plain["model"], plain["taskset"], ctx["dir"], ctx["family"], ctx["data"])
    with PeakRSS() as rss:
        start = time.perf_counter()
        result = merge_pool(
            name, pool, device=plain.get("device", "cpu"), progress=progress, **method_cfg
        )
        merge_seconds = time.perf_counter() - start
    size = _artifact_size(result, plain.get("save_result"), artifact_bytes)
    ev = evaluate_timed(
        result, ctx["data"], split=plain["eval"]["split"], batch_size=plain["eval"].get("batch_size"),
        cache=ctx["cache"], progress=progress,
    )  # fmt: skip
    record = RunRecord(
        method=name,
        label=label,
        family=family,
        taskset=taskset,
        config=config,
        scores=ev.scores,
        merge_seconds=merge_seconds,
        eval_seconds=ev.seconds,
        peak_rss_bytes=rss.peak,
        artifact_bytes=size,
        extra={"examples_per_second": ev.examples_per_second, "zoo": str(ctx["dir"])},
    )
    sweep = current_sweep_id()
    if store is not None:
        from mergebench.store import record_hash

        for ref in references:
            if not store.has_run(record_hash(ref)):
                store.add_run(ref, sweep_id=sweep)
        store.add_run(record, sweep_id=sweep)
    log_with_leaderboard(logger, record, (plain.get("store") or {}).get("path"), sweep)
    print_table([*references, record], file=sys.stdout)
    print(
        f"{label}: merge {merge_seconds:.1f} s, peak RSS {rss.peak / 2**20:.0f} MiB, artifact "
        f"{size / 2**20:.1f} MiB, evaluation {ev.seconds:.1f} s ({ev.examples_per_second:.0f} examples/s)"
    )
    return {
        "label": label,
        "scores": [asdict(s) for s in ev.scores],
        "merge_seconds": merge_seconds,
    }


def _open_store(plain: Mapping[str, Any]):
    path = (plain.get("store") or {}).get("path")
    if not path:
        return None
    from mergebench.store import ResultsStore

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return ResultsStore(path)


def _artifact_size(result: Any, save_to: str | None, measure) -> int:
    """Bytes of the saved merge artifact (saved to `save_to`, or to a scratch folder)."""
    if save_to:
        return measure(result.save(save_to))
    scratch = tempfile.mkdtemp(prefix="mergebench-artifact-")
    try:
        return measure(result.save(Path(scratch) / "result"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------- table


def print_table(records: Sequence[RunRecord], file: Any = None) -> None:
    """Per-task scores (%) of each row, average, and normalized average vs `individual`."""
    from rich.console import Console
    from rich.table import Table

    from mergebench.evaluate import average, normalized_average

    if not records:
        return
    tasks = [s.task for s in records[-1].scores]
    individual = next((r.scores for r in records if r.method == "individual"), None)
    first = records[-1]
    table = Table(
        title=f"{first.family} / {first.taskset} ({first.scores[0].split if first.scores else ''})"
    )
    table.add_column("method")
    for t in tasks:
        table.add_column(t, justify="right")
    table.add_column("avg", justify="right")
    table.add_column("norm. avg", justify="right")
    for r in records:
        by_task = {s.task: s.value for s in r.scores}
        norm = normalized_average(r.scores, individual) if individual else float("nan")
        table.add_row(
            r.label,
            *[f"{100 * by_task[t]:.1f}" if t in by_task else "-" for t in tasks],
            f"{100 * average(r.scores):.1f}",
            f"{100 * norm:.1f}",
            style="dim" if r.method in REFERENCE_ROWS else "bold",
        )
    Console(file=file or sys.stdout, width=max(100, 14 * (len(tasks) + 3))).print(table)


# ---------------------------------------------------------------------------- entry point


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def _app(cfg: DictConfig) -> dict[str, Any]:
    try:
        return run(cfg)
    except MergeBenchError as exc:
        print(f"mergebench: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    from mergebench.cli import run_hydra_app

    run_hydra_app(_app)


if __name__ == "__main__":
    main()
