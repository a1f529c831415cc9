"""Experiment loggers: `logger=none` (nothing) or `logger=wandb` (Weights & Biases).

W&B runs offline unless the user asks otherwise (`logger.mode=online`, or `WANDB_MODE` set
in the environment; being logged in alone uploads nothing), so a benchmark never needs a
network: runs land in `<dir>/wandb/offline-run-*` and can be uploaded later with `wandb
sync`. One W&B run per mergebench run, grouped by sweep, carrying the resolved config,
per-task metrics, averages, merge cost, and the leaderboard as a table. A run logged with
its store key (the run's hash) gets the W&B run id `wandb_run_id(key)`, so logging a stored
run again can find the first one (`once=True`). Every run prints one line saying where it
went.

"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from mergebench.report.boards import Board, load_boards, run_lineage
from mergebench.report.records import RunRecord, average_score, primary_scores
from mergebench.report.store import Store, redact_secrets
from mergebench.util.errors import MergeBenchError


class RunLogger(Protocol):
    def log_run(
        self,
        record: RunRecord,
        boards: Sequence[Board] | None = None,
        sweep_id: str | None = None,
        key: str | None = None,
        once: bool = False,
    ) -> bool:
        """Log `record`; `key` is its store hash, `once` skips a run logged under that key
        before. True when a run was logged now."""
        ...


class NoLogger:
    """`logger=none`: logs nothing."""

    def log_run(
        self,
        record: RunRecord,
        boards: Sequence[Board] | None = None,
        sweep_id: str | None = None,
        key: str | None = None,
        once: bool = False,
    ) -> bool:
        return False


def run_metrics(record: RunRecord, boards: Sequence[Board] | None = None) -> dict[str, float]:
    """Flat metrics of one run: `test/<task>/<metric>`, `val/...`, averages and cost."""
    metrics: dict[str, float] = {}
    for s in record.scores:
        prefix = "test" if s.split == "test" else ("val" if s.split == "validation" else s.split)
        metrics[f"{prefix}/{s.task}/{s.metric}"] = float(s.value)
    if primary_scores(record.scores, "test"):
        metrics["test/avg"] = average_score(record.scores, "test")
    row = _board_row(record, boards)
    if row is not None:
        if row.normalized_average is not None:
            metrics["test/normalized_avg"] = row.normalized_average
        if row.rank is not None:
            metrics["rank"] = float(row.rank)
    metrics["cost/merge_seconds"] = float(record.merge_seconds)
    metrics["cost/eval_seconds"] = float(record.eval_seconds)
    metrics["cost/peak_rss_bytes"] = float(record.peak_rss_bytes)
    metrics["cost/artifact_bytes"] = float(record.artifact_bytes)
    return metrics


def _board_row(record: RunRecord, boards: Sequence[Board] | None):
    tasks = {s.task for s in record.scores if s.split == "test"}
    lineage = run_lineage({"config": record.config})  # boards of other lineages are not its
    for board in boards or ():
        if (board.family, board.taskset, set(board.tasks), board.lineage) == (
            record.family,
            record.taskset,
            tasks,
            lineage,
        ):
            return board.row(record.label)
    return None


def leaderboard_table(boards: Sequence[Board]) -> tuple[list[str], list[list[Any]]]:
    """Long-format rows for a `wandb.Table` (one row per board, method and task)."""
    columns = ["family", "taskset", "label", "rank", "task", "score", "normalized", "published"]
    data: list[list[Any]] = []
    for b in boards:
        for r in b.rows:
            for t in [*b.tasks, "average"]:
                if t == "average":
                    values = (r.average, r.normalized_average, r.published_average)
                else:
                    values = (r.scores[t], r.normalized[t], r.published_scores.get(t))
                data.append([b.family, b.taskset, r.label, r.rank, t, *values])
    return columns, data


def resolve_mode(mode: str | None) -> str:
    """Explicit `logger.mode`, else `WANDB_MODE` from the environment, else offline."""
    chosen = mode or os.environ.get("WANDB_MODE") or "offline"
    if chosen not in ("online", "offline", "disabled"):
        raise MergeBenchError(f"logger.mode: {chosen!r} is not one of online, offline, disabled")
    return chosen


def wandb_run_id(key: str) -> str:
    """The W&B run id of the run stored under hash `key` (its first 32 hex digits): the same
    stored run always maps to the same W&B run."""
    return key[:32]


def run_name(record: RunRecord) -> str:
    return f"{record.label} | {record.family}/{record.taskset}"


class WandbLogger:
    """`logger=wandb`: one W&B run per mergebench run, offline unless configured otherwise."""

    def __init__(
        self,
        project: str = "mergebench",
        entity: str | None = None,
        mode: str | None = None,
        dir: str | os.PathLike[str] = "outputs",
        group: str | None = None,
        tags: Sequence[str] = (),
        job_type: str = "merge",
    ) -> None:
        self.project = project
        self.entity = entity
        self.mode = resolve_mode(mode)
        self.dir = Path(dir)
        self.group = group
        self.tags = list(tags)
        self.job_type = job_type

    def logged_offline(self, run_id: str) -> Path | None:
        """The newest offline run folder of W&B run `run_id` under this logger's dir, if any."""
        found = sorted((self.dir / "wandb").glob(f"offline-run-*-{run_id}"))
        return found[-1] if found else None

    def log_run(
        self,
        record: RunRecord,
        boards: Sequence[Board] | None = None,
        sweep_id: str | None = None,
        key: str | None = None,
        once: bool = False,
    ) -> bool:
        """One W&B run for `record`, under the id `wandb_run_id(key)` when `key` (the run's
        store hash) is given. `once`: skip a run already logged under that id (offline: its
        folder under `<dir>/wandb`; online: W&B resumes an existing run). Prints where the
        run went; True when it was logged now."""
        import wandb

        run_id = wandb_run_id(key) if key else None
        if once and run_id and self.mode == "offline":
            folder = self.logged_offline(run_id)
            if folder is not None:
                _say(f"W&B: {run_name(record)} already logged offline in {folder}")
                return False
        self.dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            dir=str(self.dir),
            id=run_id,
            resume="allow" if run_id else None,  # online: a forced rerun updates its run
            group=self.group or sweep_id or current_sweep_id(),
            job_type=self.job_type,
            name=run_name(record),
            tags=[*self.tags, record.method, record.family, record.taskset],
            config={
                **redact_secrets(record.config),  # a store URL's password never reaches W&B
                "mergebench": {
                    "method": record.method,
                    "label": record.label,
                    "family": record.family,
                    "taskset": record.taskset,
                    "run_hash": key,
                },
            },
            reinit="finish_previous",
            # use_dot_wandb=False: always `<dir>/wandb`, where `logged_offline` looks
            settings=wandb.Settings(
                silent=True, console="off", x_disable_stats=True, use_dot_wandb=False
            ),
        )
        where = run_location(run)
        if once and run.resumed:  # online, and W&B has this run already
            run.finish()
            _say(f"W&B: {run_name(record)} already logged at {where}")
            return False
        try:
            metrics = run_metrics(record, boards)
            run.log(metrics)
            run.summary.update(metrics)
            if boards:
                columns, data = leaderboard_table(boards)
                run.log({"leaderboard": wandb.Table(columns=columns, data=data)})
        finally:
            run.finish()
        _say(f"W&B: {run_name(record)} -> {where}")
        return True


def run_location(run: Any) -> str:
    """Where a W&B run went: its URL online, its folder and how to upload it offline."""
    if run.settings.mode == "disabled":
        return "nowhere (W&B mode disabled)"
    if run.offline:
        folder = run.settings.sync_dir
        return f"{folder} (offline; upload: wandb sync {folder})"
    return str(run.url)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build_logger(cfg: Mapping[str, Any] | None, output_dir: str | os.PathLike[str] = "outputs"):
    """The logger a `conf/logger/<name>.yaml` asks for (`name: none` or `name: wandb`)."""
    cfg = dict(cfg or {})
    name = cfg.pop("name", "none")
    if name in (None, "none"):
        return NoLogger()
    if name != "wandb":
        raise MergeBenchError(f"logger: unknown logger {name!r} (choose from none, wandb)")
    allowed = {"project", "entity", "mode", "dir", "group", "tags", "job_type"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise MergeBenchError(
            f"logger.{unknown[0]}: unknown option (options: {', '.join(sorted(allowed))})"
        )
    cfg["dir"] = cfg.get("dir") or output_dir
    cfg["tags"] = list(cfg.get("tags") or [])
    return WandbLogger(**cfg)


def logger_from_config(cfg: Mapping[str, Any]) -> RunLogger:
    """The logger of a `mergebench` job config; W&B files go next to the runs store.
    Built before the run starts, so a bad `logger` option fails before any work is done."""
    db = (cfg.get("store") or {}).get("path")
    return build_logger(cfg.get("logger"), output_dir=Path(db).parent if db else "outputs")


def log_with_leaderboard(
    logger: RunLogger,
    record: RunRecord,
    db: str | Store | None,
    sweep_id: str | None = None,
    key: str | None = None,
    once: bool = False,
) -> bool:
    """Log one run, with the leaderboard of its family and task set from the store (which
    already holds the run): a `Store`, or a database path. `key`, `once`: as `log_run`."""
    if isinstance(logger, NoLogger):
        return False
    boards = None
    if isinstance(db, Store) or (db and Path(db).is_file()):
        boards = load_boards(db, family=record.family, taskset=record.taskset)
    return logger.log_run(record, boards, sweep_id=sweep_id, key=key, once=once)


def current_sweep_id() -> str | None:
    """The Hydra multirun this process belongs to (its sweep folder), or None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(hc.sweep.dir)).strip("-")
    except Exception:  # no Hydra context: a plain Python call
        return None
