"""Experiment loggers: `logger=none` (nothing) or `logger=wandb` (Weights & Biases).

W&B runs offline unless the user asks otherwise (`logger.mode=online`, or `WANDB_MODE` set
in the environment), so a benchmark never needs a network: runs land in
`<dir>/wandb/offline-run-*` and can be uploaded later with `wandb sync`. One W&B run per
mergebench run, grouped by sweep, carrying the resolved config, per-task metrics, averages,
merge cost, and the leaderboard as a table.

`read_offline_run` reads an offline run's `.wandb` file back (a LevelDB-style log of W&B
protobuf records), so tests and users can check what was logged without any server.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mergebench.report.boards import Board, load_boards
from mergebench.report.records import RunRecord
from mergebench.util.errors import MergeBenchError


class RunLogger(Protocol):
    def log_run(
        self, record: RunRecord, boards: Sequence[Board] | None = None, sweep_id: str | None = None
    ) -> None: ...


class NoLogger:
    """`logger=none`: logs nothing."""

    def log_run(
        self, record: RunRecord, boards: Sequence[Board] | None = None, sweep_id: str | None = None
    ) -> None:
        return None


def run_metrics(record: RunRecord, boards: Sequence[Board] | None = None) -> dict[str, float]:
    """Flat metrics of one run: `test/<task>/<metric>`, `val/...`, averages and cost."""
    metrics: dict[str, float] = {}
    primary: dict[str, float] = {}
    for s in record.scores:
        prefix = "test" if s.split == "test" else ("val" if s.split == "validation" else s.split)
        metrics[f"{prefix}/{s.task}/{s.metric}"] = float(s.value)
        if s.split == "test":
            primary.setdefault(s.task, float(s.value))  # first metric of a task is its primary
    if primary:
        metrics["test/avg"] = sum(primary.values()) / len(primary)
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
    for board in boards or ():
        if (board.family, board.taskset, set(board.tasks)) == (
            record.family,
            record.taskset,
            tasks,
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

    def log_run(
        self, record: RunRecord, boards: Sequence[Board] | None = None, sweep_id: str | None = None
    ) -> None:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            dir=str(self.dir),
            group=self.group or sweep_id or current_sweep_id(),
            job_type=self.job_type,
            name=f"{record.label} | {record.family}/{record.taskset}",
            tags=[*self.tags, record.method, record.family, record.taskset],
            config={
                **record.config,
                "mergebench": {
                    "method": record.method,
                    "label": record.label,
                    "family": record.family,
                    "taskset": record.taskset,
                },
            },
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        try:
            metrics = run_metrics(record, boards)
            run.log(metrics)
            run.summary.update(metrics)
            if boards:
                columns, data = leaderboard_table(boards)
                run.log({"leaderboard": wandb.Table(columns=columns, data=data)})
        finally:
            run.finish()


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
    """The logger of a `mergebench` job config; W&B files go next to the results database.
    Built before the run starts, so a bad `logger` option fails before any work is done."""
    db = (cfg.get("store") or {}).get("path")
    return build_logger(cfg.get("logger"), output_dir=Path(db).parent if db else "outputs")


def log_with_leaderboard(
    logger: RunLogger, record: RunRecord, db: str | None, sweep_id: str | None = None
) -> None:
    """Log one run, with the leaderboard of its family and task set from the store (which
    already holds the run)."""
    if isinstance(logger, NoLogger):
        return
    boards = None
    if db and Path(db).is_file():
        boards = load_boards(db, family=record.family, taskset=record.taskset)
    logger.log_run(record, boards, sweep_id=sweep_id)


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


# -- reading offline runs ----------------------------------------------------------------------
_HEADER = b":W&B"
_BLOCK = 32768
_RECORD_HEADER = 7  # crc32 (4) + length (2) + type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: str | os.PathLike[str]) -> list[Any]:
    """Every protobuf `Record` in a `.wandb` transaction log, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != _HEADER:
        raise MergeBenchError(f"{path}: not a W&B run file (bad header)")
    pos, pending, records = 7, b"", []
    while pos + _RECORD_HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _RECORD_HEADER:  # block tail too short: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        pos += _RECORD_HEADER
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST):  # zero padding: skip to the next block
            pos += (_BLOCK - pos % _BLOCK) % _BLOCK
            continue
        chunk, pos = data[pos : pos + length], pos + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@dataclass
class OfflineRun:
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    name: str | None = None
    complete: bool = False  # the run's exit record is in the file


def _item_key(item: Any) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def read_offline_run(run_dir: str | os.PathLike[str], timeout_s: float = 10.0) -> OfflineRun:
    """Config, history rows and summary of an offline run folder (`.../offline-run-*`).

    W&B's service process flushes the run file shortly after `run.finish()` returns, so this
    waits (up to `timeout_s`) for the run's exit record; after that it returns what is
    there, with `complete=False` (a crashed or still running run)."""
    import time

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise MergeBenchError(f"{run_dir}: no run-*.wandb file (not a W&B offline run folder)")
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(files[0])
        complete = any(r.WhichOneof("record_type") == "exit" for r in records)
        if complete or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    out = OfflineRun(complete=complete)
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.group = record.run.run_group or None
            out.name = record.run.display_name or None
            for item in record.run.config.update:
                out.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            out.history.append(
                {_item_key(i): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                out.summary[_item_key(item)] = json.loads(item.value_json)
    return out
