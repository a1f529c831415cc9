"""`mergebench-eval`: score a saved merge (`bench.saved`) on a family and task set and store
it as a row of the same board as the benchmark's, beside the reference rows.

The run's identity is what was scored (the result's method, options and manifest checksum,
or another tool's name and a digest of its tensors) on the family, task set, seed, split and
zoo signature: scoring the same folder again is "already in", another folder is a new row.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mergebench.bench.job import (
    _context,
    _open_store,
    evaluation_extra,
    print_run_scores,
    reference_records,
)
from mergebench.bench.saved import check_saved, open_saved
from mergebench.bench.settings import check_run_settings
from mergebench.evaluation import evaluate_timed
from mergebench.report.records import RunRecord
from mergebench.report.wandb import current_sweep_id, log_with_leaderboard, logger_from_config
from mergebench.results import artifact_bytes
from mergebench.sources.zoo import set_threads

# What a benchmark config holds that has no say in scoring a saved merge.
NOT_FOR_SAVED = ("method", "protocol", "save_result", "variant", "experiment")


def run_saved(
    cfg: DictConfig | Mapping[str, Any], path: str | Path, name: str | None = None
) -> dict[str, Any]:
    """Score the merge saved at `path` on `cfg`'s family and task set, store and print it;
    returns a summary (`skipped` when its row is already stored)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    for key in ("hydra", *NOT_FOR_SAVED):
        plain.pop(key, None)
    check_run_settings(plain)
    check_saved(path, name)
    progress = bool(plain.get("progress", True))
    set_threads(plain.get("threads"))
    ctx = _context(plain, progress)
    saved = open_saved(path, ctx.source.pool(), name)
    label = plain.get("label") or saved.label
    family, taskset = str(plain["model"]["name"]), str(plain["taskset"]["name"])
    config = {
        **{k: plain[k] for k in ("model", "taskset", "seed", "zoo", "eval") if k in plain},
        "zoo_signature": ctx.signature,
        "evaluated": saved.identity,
    }
    store = _open_store(plain)
    logger = logger_from_config(plain)  # a bad logger option fails before any work
    probe = RunRecord(saved.method, label, family, taskset, config, scores=[])
    if (
        store is not None
        and not plain.get("force", False)
        and store.has_run(store.record_hash(probe))
    ):
        print(f"{label} on {family}/{taskset}: already in {store.location} "
              "(force=true to score it again)", file=sys.stderr)  # fmt: skip
        return {"label": label, "skipped": True}

    references = reference_records(plain, ctx, progress) if plain.get("references", True) else []
    ev = evaluate_timed(
        saved.result, ctx.data, split=plain["eval"]["split"],
        batch_size=plain["eval"].get("batch_size"), cache=ctx.cache, progress=progress,
    )  # fmt: skip
    where = Path(path).expanduser()
    size = artifact_bytes(where) if where.is_dir() else where.stat().st_size
    record = RunRecord(
        method=saved.method,
        label=label,
        family=family,
        taskset=taskset,
        config=config,
        scores=ev.scores,
        eval_seconds=ev.seconds,
        artifact_bytes=size,
        extra={
            **evaluation_extra(ev),
            "zoo": str(ctx.source.cache_dir()),
            "base_label": saved.base_label,
            "evaluated_from": str(where.resolve()),
        },
    )
    sweep = current_sweep_id()
    if store is not None:
        for ref in references:
            if not store.has_run(store.record_hash(ref)):
                store.add_run(ref, sweep_id=sweep)
        store.add_run(record, sweep_id=sweep)
    log_with_leaderboard(logger, record, store, sweep)
    print_run_scores([*references, record], file=sys.stdout)
    print(f"{label}: evaluation {ev.seconds:.1f} s ({ev.examples_per_second:.0f} examples/s)")
    print(f"{label}: stored in {store.location}" if store is not None
          else f"{label}: not stored (store.path and store.url are null)")  # fmt: skip
    return {"label": label, "scores": [asdict(s) for s in ev.scores]}
