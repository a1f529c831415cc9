"""`mergebench`: the Hydra app that runs one method on one family and task set of the offline
zoo, evaluates every task with the common evaluator, stores the run, and prints its scores
beside the reference rows (individual, multitask, pretrained).

    mergebench                                        # EMR on the text set (MiniLM)
    mergebench method=ties model=efficientnet_lite0 taskset=vision
    mergebench -m +variant=glob(*) +experiment=bench_text,bench_vision_vit   # every variant

`make bench` runs `scripts/run_bench.py`: the variants whose `board:` is `default`
(`mergebench.bench.variants`), then the leaderboard.

In a multirun (the basic launcher runs jobs one after another in this process) the family,
its data and the evaluation models are loaded once per task set and reused.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from mergebench.api import merge_pool
from mergebench.bench.identity import VOLATILE_KEYS
from mergebench.bench.protocol import Selection, UserSettings, run_label, select, user_settings
from mergebench.bench.settings import check_run_settings
from mergebench.evaluation import (
    Evaluation,
    ModelCache,
    average,
    evaluate_timed,
    normalized_average,
)
from mergebench.families.labeled import LabeledData
from mergebench.methods.registry import method_base_label, method_class
from mergebench.report.records import RunRecord, TaskScore, primary_scores
from mergebench.report.store import Store, open_store
from mergebench.report.wandb import (
    NoLogger,
    RunLogger,
    current_sweep_id,
    log_with_leaderboard,
    logger_from_config,
)
from mergebench.results import artifact_bytes
from mergebench.sources import REFERENCE_ROWS, CheckpointSource, open_source
from mergebench.sources.zoo import set_threads
from mergebench.util.fs import atomic_write_text
from mergebench.util.hashing import stable_hash
from mergebench.util.memory import PeakRSS
from mergebench.util.progress import say, to_log_files

# ---------------------------------------------------------------------------- context


@dataclass
class Context:
    """What a task set's jobs share in one process: the checkpoint source, its signature and
    the evaluator's model cache (a multirun loads family and data once)."""

    source: CheckpointSource
    signature: str
    cache: ModelCache
    # Validation selections of this pool, shared by the jobs of a multirun.
    selections: dict[str, Selection] = field(default_factory=dict)

    @property
    def data(self) -> LabeledData:
        return self.source.data


_CONTEXTS: dict[str, Context] = {}


def _context(cfg: Mapping[str, Any], progress: bool) -> Context:
    """The source (zoo built or refreshed first when allowed) of this task set, once per process."""
    key = stable_hash([cfg["model"], cfg["taskset"], cfg.get("seed", 0), cfg.get("zoo")])
    if key not in _CONTEXTS:
        source = open_source(cfg, progress=progress)
        _CONTEXTS[key] = Context(source, source.signature(), ModelCache(source.data))
    return _CONTEXTS[key]


def evaluation_extra(ev: Evaluation) -> dict[str, Any]:
    """What a row keeps of its evaluation beside the scores: the throughput, and each
    task's per-example outcomes (the paired intervals are drawn from them)."""
    return {
        "examples_per_second": ev.examples_per_second,
        "outcomes": {t: o.to_json() for t, o in ev.outcomes.items()},
    }


# ---------------------------------------------------------------------------- reference rows


def reference_records(
    cfg: Mapping[str, Any], ctx: Mapping[str, Any], progress: bool
) -> list[RunRecord]:
    """individual / multitask / pretrained rows, evaluated once per zoo and cached in
    `<zoo>/references/<taskset>.json` (keyed by the zoo's signature and the split)."""
    taskset = str(cfg["taskset"]["name"])
    split = str(cfg["eval"]["split"])
    path = ctx.source.cache_dir() / "references" / f"{taskset}.json"
    wanted = {"signature": ctx.signature, "split": split, "tasks": ctx.data.tasks}
    cached: dict[str, Any] = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text())
        except json.JSONDecodeError:
            cached = {}
    if {k: cached.get(k) for k in wanted} != wanted:
        cached = {**wanted, "rows": {}}
    kinds = list(ctx.source.reference_kinds())
    for kind in kinds:
        if kind in cached["rows"]:
            continue
        ev = evaluate_timed(ctx.source.reference(kind), ctx.data, split=split,
                            batch_size=cfg["eval"].get("batch_size"), cache=ctx.cache,
                            progress=progress)  # fmt: skip
        cached["rows"][kind] = {
            "scores": [asdict(s) for s in ev.scores],
            "eval_seconds": ev.seconds,
            **evaluation_extra(ev),
        }
        atomic_write_text(path, json.dumps(cached))
    records = []
    for kind in kinds:
        row = cached["rows"][kind]
        records.append(
            RunRecord(
                method=kind.partition(":")[0],  # `expert:<name>` rows are `expert` rows
                label=kind,
                family=str(cfg["model"]["name"]),
                taskset=taskset,
                config=_reference_config(cfg, ctx, kind),
                scores=[TaskScore(**s) for s in row["scores"]],
                eval_seconds=row["eval_seconds"],
                extra={
                    "examples_per_second": row["examples_per_second"],
                    "zoo": str(ctx.source.cache_dir()),
                    "outcomes": row.get("outcomes", {}),
                },
            )
        )
    return records


def zoo_reference_records(cfg: Mapping[str, Any], progress: bool = False) -> list[RunRecord]:
    """The reference rows of a built zoo (`cfg` holds model, taskset, seed, zoo, eval),
    evaluated and cached now, as `mergebench-zoo` does right after training, so that the
    benchmark's first job finds them."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    plain["zoo"] = {**(plain.get("zoo") or {}), "build_missing": False}
    return reference_records(plain, _context(plain, progress), progress)


def _reference_config(cfg: Mapping[str, Any], ctx: Mapping[str, Any], kind: str) -> dict[str, Any]:
    return {
        "reference": kind,
        "model": cfg["model"],
        "taskset": cfg["taskset"],
        "seed": cfg.get("seed", 0),
        "eval": {"split": cfg["eval"]["split"]},
        "zoo_signature": ctx.signature,
    }


# ---------------------------------------------------------------------------- one run


def run(cfg: DictConfig | Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Merge, evaluate, store and print one method on one task set; returns a summary.

    `overrides`: the job's command-line overrides (Hydra's task overrides); the method
    options and search grids they set are fixed and named in the label (`run_label`)."""

    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    plain.pop("hydra", None)
    check_run_settings(plain)
    progress = bool(plain.get("progress", True))

    set_threads(plain.get("threads"))
    ctx = _context(plain, progress)
    method_cfg = dict(plain["method"])
    name = str(method_cfg.pop("name"))
    search = method_cfg.pop("search", None)  # the protocol's grid (protocol.select)
    settings: UserSettings = user_settings(overrides)
    label = plain.get("label") or run_label(name, method_cfg, search, settings)
    family, taskset = str(plain["model"]["name"]), str(plain["taskset"]["name"])
    config = {**plain, "zoo_signature": ctx.signature, **method_versions(name, method_cfg)}

    store = _open_store(plain)
    logger = logger_from_config(plain)  # a bad logger option fails before any work
    if store is not None and not plain.get("force", False):
        probe = RunRecord(
            method=name, label=label, family=family, taskset=taskset, config=config, scores=[]
        )
        key = store.record_hash(probe)
        if store.has_run(key):
            print(f"{label} on {family}/{taskset}: already in {store.location} "
                  "(force=true to run again)", file=sys.stderr)  # fmt: skip
            log_stored_run(logger, store, key, probe)
            return {"label": label, "skipped": True}

    references = reference_records(plain, ctx, progress) if plain.get("references", True) else []
    pool = ctx.source.pool()
    device = str(plain.get("device", "cpu"))
    selection = Selection()
    if (plain.get("protocol") or {}).get("select", True):
        selection = select(
            name, method_cfg, pool,
            lambda r: evaluate_timed(r, ctx.data, split="validation", cache=ctx.cache).scores,
            device=device, say=say, memo=ctx.selections, settings=settings, search=search,
            progress=progress,
        )  # fmt: skip
    save_to = plain.get("save_result")
    with PeakRSS() as rss:
        start = time.perf_counter()
        # With `save_result`, the artifact is written as the merge goes and read back lazily.
        result = merge_pool(
            name, pool, device=device, progress=progress, output_dir=save_to or None,
            **_llm_options(plain["model"]), **{**method_cfg, **selection.selected},
        )  # fmt: skip
        merge_seconds = time.perf_counter() - start
    size = artifact_bytes(save_to) if save_to else _artifact_size(result, artifact_bytes)
    ev = evaluate_timed(
        result, ctx.data, split=plain["eval"]["split"], batch_size=plain["eval"].get("batch_size"),
        cache=ctx.cache, progress=progress,
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
        extra={
            **evaluation_extra(ev),
            "zoo": str(ctx.source.cache_dir()),
            "base_label": method_base_label(name, method_cfg),
            "selected": selection.selected,
            "selection": selection.to_json(),
            "cost": run_cost(selection, rss),
        },
    )
    sweep = current_sweep_id()
    if store is not None:
        for ref in references:
            if not store.has_run(store.record_hash(ref)):
                store.add_run(ref, sweep_id=sweep)
        store.add_run(record, sweep_id=sweep)
    key = store.record_hash(record) if store is not None else None
    log_with_leaderboard(logger, record, store, sweep, key=key)
    print_run_scores([*references, record], file=sys.stdout)
    done = (
        f"{label}: merge {merge_seconds:.1f} s (+{rss.own / 2**20:.0f} MiB resident at its peak, "
        f"process {rss.peak / 2**20:.0f} MiB), validation selection {selection.seconds:.1f} s "
        f"({selection.evaluated} candidates), artifact {size / 2**20:.1f} MiB, "
        f"evaluation {ev.seconds:.1f} s ({ev.examples_per_second:.0f} examples/s)"
    )
    # Where the row went (issue 22.7): the board reads it from there.
    stored = (f"{label}: stored in {store.location}" if store is not None
              else f"{label}: not stored (store.path and store.url are null)")  # fmt: skip
    for line in (done, stored):
        print(line)
        to_log_files(line)  # the job's log (Hydra) holds them too
    return {
        "label": label,
        "scores": [asdict(s) for s in ev.scores],
        "merge_seconds": merge_seconds,
    }


def log_stored_run(logger: RunLogger, store: Store, key: str, probe: RunRecord) -> None:
    """`logger=wandb` on a run already stored: log the stored run (scores, cost and config as
    stored) unless it was logged under its hash before."""
    if isinstance(logger, NoLogger):
        return
    for row in store.runs(family=probe.family, taskset=probe.taskset, method=probe.method):
        if row["config_hash"] == key:
            record = store.get_record(row["run_id"])
            log_with_leaderboard(logger, record, store, row.get("sweep_id"), key=key, once=True)
            return


def _llm_options(cfg_model: Mapping[str, Any]) -> dict[str, Any]:
    """A causal LM's vocabulary policy and output dtype (`model.vocab`, `model.out_dtype`)."""
    return {k: cfg_model[k] for k in ("vocab", "out_dtype") if cfg_model.get(k) is not None}


def run_cost(selection: Selection, rss: PeakRSS) -> dict[str, Any]:
    """The costs a row records beside its merge seconds (`extra["cost"]`): the validation
    selection's seconds and candidates (`Selection.seconds`, `.evaluated`), the merge's own
    resident peak above the process's resident size when it started, that starting size, and
    the process's high-water mark (the `peak_rss_bytes` column keeps the process's resident
    peak during the merge, as before)."""
    return {
        "selection_seconds": round(selection.seconds, 2),
        "selection_candidates": selection.evaluated,
        "merge_peak_bytes": rss.own,
        "merge_start_rss_bytes": rss.start,
        "process_high_water_bytes": rss.high_water,
    }


def method_versions(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """`{"method_versions": {method: version}}` for a method (or the base method it builds
    on) whose results changed since version 1 (DARE's draws: 2), else nothing: a changed
    method gets new run hashes, so a resumed sweep reruns it, and every other stored run
    keeps its hash."""
    names = [name] + [str(options["base"])] if options.get("base") else [name]
    versions = {n: method_class(n).version for n in names if method_class(n).version > 1}
    return {"method_versions": versions} if versions else {}


def _open_store(plain: Mapping[str, Any]):
    """The runs store of `store.url` (SQLite path or URL, PostgreSQL URL), else of
    `store.path`; None when both are null. Opened for writing: the schema is created."""
    conf = plain.get("store") or {}
    target = conf.get("url") or conf.get("path")
    if not target:
        return None
    return open_store(
        str(target),
        allow_network_fs=bool(conf.get("allow_network_fs", False)),
        volatile_keys=VOLATILE_KEYS,
    )


def _artifact_size(result: Any, measure) -> int:
    """Bytes of the merge artifact, saved to a scratch folder to measure them."""
    scratch = tempfile.mkdtemp(prefix="mergebench-artifact-")
    try:
        return measure(result.save(Path(scratch) / "result"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------- table


def print_run_scores(records: Sequence[RunRecord], file: Any = None) -> None:
    """Per-task scores (%) of each row, average, and normalized average vs `individual`."""
    if not records:
        return
    tasks = list(dict.fromkeys(s.task for s in records[-1].scores))  # primary metrics only
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
        by_task = primary_scores(r.scores, split=None)
        norm = normalized_average(r.scores, individual) if individual else float("nan")
        table.add_row(
            r.label,
            *[f"{100 * by_task[t]:.1f}" if t in by_task else "-" for t in tasks],
            f"{100 * average(r.scores):.1f}",
            f"{100 * norm:.1f}",
            style="dim" if r.method in REFERENCE_ROWS else "bold",
        )
    Console(file=file or sys.stdout, width=max(100, 14 * (len(tasks) + 3))).print(table)
