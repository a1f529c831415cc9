"""The results store: one SQLite database with a row per run and a row per (run, task, metric).

Several Hydra multirun jobs (joblib processes, SLURM array tasks) write to the same file at
once, so the database runs in WAL mode with a generous busy timeout, and every write is one
short `BEGIN IMMEDIATE` transaction. A run is identified by the hash of its resolved config
(minus keys that do not change results, such as output paths or the logger), so a sweep that
was interrupted can skip what is already stored and resume where it stopped.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
import sqlite3
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergebench.report.records import RunRecord, TaskScore
from mergebench.util.errors import MergeBenchError

DEFAULT_DB = Path("outputs") / "results.sqlite"

# Config keys (dotted paths) that say where and how a run reports or where caches live, not
# what it computes: runs that differ only in these share a hash, so a resumed sweep skips them.
VOLATILE_KEYS = frozenset(
    {
        "hydra",
        "force",
        "logger",
        "store",
        "db",
        "paths",
        "output_dir",
        "out_dir",
        "outputs",
        "save_result",
        "progress",
        "device",
        "wandb",
        "sweep_id",
        "num_workers",
        "references",
        "zoo.dir",
        "zoo.build_missing",
        "eval.batch_size",
    }
)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    config_hash TEXT NOT NULL UNIQUE,
    method TEXT NOT NULL,
    label TEXT NOT NULL,
    family TEXT NOT NULL,
    taskset TEXT NOT NULL,
    config_json TEXT NOT NULL,
    version TEXT,
    git_commit TEXT,
    created_at TEXT NOT NULL,
    merge_seconds REAL,
    eval_seconds REAL,
    peak_rss_bytes INTEGER,
    artifact_bytes INTEGER,
    sweep_id TEXT,
    extra_json TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS scores (
    run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    split TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, task, metric, split)
);
CREATE INDEX IF NOT EXISTS runs_by_setting ON runs (family, taskset, label);
"""


def _jsonable(value: Any) -> Any:
    """Plain JSON types for configs that may hold OmegaConf nodes, paths or tuples."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return _jsonable(OmegaConf.to_container(value, resolve=True))
    except ImportError:  # omegaconf is a dependency; this only keeps the store importable alone
        pass
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain JSON data without the volatile top-level keys."""
    plain = _jsonable(config)
    if not isinstance(plain, dict):
        raise MergeBenchError(f"config: expected a mapping, got {type(config).__name__}")
    return _drop_volatile(plain, "")


def _drop_volatile(node: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in node.items():
        path = prefix + key
        if path in VOLATILE_KEYS:
            continue
        out[key] = _drop_volatile(value, path + ".") if isinstance(value, dict) else value
    return out


def config_hash(config: Mapping[str, Any], label: str | None = None) -> str:
    """sha256 of the canonical JSON of `config`; `label` separates rows that share a config
    (e.g. the `individual` and `pretrained` reference rows of one benchmark job)."""
    payload: dict[str, Any] = {"config": canonical_config(config)}
    if label is not None:
        payload["label"] = label
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_hash(record: RunRecord) -> str:
    """The key a record is stored under: its config, plus its label."""
    return config_hash(record.config, label=record.label)


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("mergebench")
    except Exception:  # not installed (e.g. run from a source tree): still record something
        return "unknown"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the source tree mergebench runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ResultsStore:
    """Results database at `path` (created on first use, parent directories included)."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_DB, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        if self.path.exists() and self.path.is_dir():
            raise MergeBenchError(f"store path {self.path}: is a directory, expected a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            self._init_schema(con)

    # -- connection -----------------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise MergeBenchError(f"store {self.path}: cannot open ({exc})") from exc
        try:
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            con.execute("PRAGMA foreign_keys = ON")
            # In WAL mode NORMAL never corrupts the file; a power cut may lose the last commit
            # (that run is then simply re-run on resume). FULL would fsync every commit.
            con.execute("PRAGMA synchronous = NORMAL")
            yield con
        except sqlite3.DatabaseError as exc:
            raise MergeBenchError(f"store {self.path}: {exc}") from exc
        finally:
            con.close()

    def _init_schema(self, con: sqlite3.Connection) -> None:
        # WAL lets readers (leaderboards) run while jobs write; the mode is stored in the file.
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("BEGIN IMMEDIATE")
        try:
            # One statement at a time: executescript() would commit the open transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise MergeBenchError(
                    f"store {self.path}: schema version {row[0]}, this mergebench reads "
                    f"{SCHEMA_VERSION} (use a new --db path)"
                )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    # -- writing --------------------------------------------------------------------------
    def has_run(self, config_hash_: str) -> bool:
        with self._connect() as con:
            row = con.execute(
                "SELECT 1 FROM runs WHERE config_hash = ?", (config_hash_,)
            ).fetchone()
        return row is not None

    def add_run(
        self, record: RunRecord, config_hash_: str | None = None, sweep_id: str | None = None
    ) -> int:
        """Store `record` and its scores in one transaction and return its run id.

        A record whose hash is already stored replaces the old one (that is what `force=true`
        asks for), so the store never holds two results for one config.
        """
        key = config_hash_ or record_hash(record)
        config_json = json.dumps(_jsonable(record.config), sort_keys=True, ensure_ascii=False)
        extra = _jsonable(record.extra)
        sweep = sweep_id if sweep_id is not None else extra.get("sweep_id")
        seen: set[tuple[str, str, str]] = set()
        for s in record.scores:
            ident = (s.task, s.metric, s.split)
            if ident in seen:
                raise MergeBenchError(
                    f"run {record.label!r}: score for task {s.task!r} metric {s.metric!r} "
                    f"split {s.split!r} given twice"
                )
            seen.add(ident)
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute("DELETE FROM runs WHERE config_hash = ?", (key,))
                cur = con.execute(
                    """INSERT INTO runs (config_hash, method, label, family, taskset,
                           config_json, version, git_commit, created_at, merge_seconds,
                           eval_seconds, peak_rss_bytes, artifact_bytes, sweep_id, extra_json)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        key,
                        record.method,
                        record.label,
                        record.family,
                        record.taskset,
                        config_json,
                        package_version(),
                        git_commit(),
                        _now(),
                        float(record.merge_seconds),
                        float(record.eval_seconds),
                        int(record.peak_rss_bytes),
                        int(record.artifact_bytes),
                        sweep,
                        json.dumps(extra, sort_keys=True, ensure_ascii=False),
                    ),
                )
                run_id = int(cur.lastrowid)
                con.executemany(
                    "INSERT INTO scores (run_id, position, task, metric, split, value) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (run_id, i, s.task, s.metric, s.split, _finite_or_none(s.value))
                        for i, s in enumerate(record.scores)
                    ],
                )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return run_id

    # -- reading --------------------------------------------------------------------------
    def runs(
        self,
        family: str | None = None,
        taskset: str | None = None,
        method: str | None = None,
        sweep_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Run rows (oldest first) with `config` and `extra` decoded from JSON."""
        where, args = _filters(family=family, taskset=taskset, method=method, sweep_id=sweep_id)
        with self._connect() as con:
            rows = con.execute(f"SELECT * FROM runs {where} ORDER BY run_id", args).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["config"] = json.loads(d.pop("config_json"))
            d["extra"] = json.loads(d.pop("extra_json"))
            out.append(d)
        return out

    def scores(
        self,
        family: str | None = None,
        taskset: str | None = None,
        split: str | None = "test",
        method: str | None = None,
    ) -> list[dict[str, Any]]:
        """One dict per (run, task, metric) with the run's identifying columns, in run order
        and the order the evaluator reported the scores (the first metric of a task is its
        primary one)."""
        where, args = _filters(
            **{"r.family": family, "r.taskset": taskset, "r.method": method, "s.split": split}
        )
        sql = f"""SELECT r.run_id, r.config_hash, r.method, r.label, r.family, r.taskset,
                         r.created_at, r.sweep_id, s.task, s.metric, s.split, s.value, s.position
                  FROM scores s JOIN runs r ON r.run_id = s.run_id
                  {where}
                  ORDER BY r.run_id, s.position"""
        with self._connect() as con:
            return [dict(r) for r in con.execute(sql, args).fetchall()]

    def get_record(self, run_id: int) -> RunRecord:
        """Rebuild the RunRecord of a stored run (for re-logging or exporting)."""
        with self._connect() as con:
            r = con.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if r is None:
                raise MergeBenchError(f"store {self.path}: no run with id {run_id}")
            s = con.execute(
                "SELECT task, metric, split, value FROM scores WHERE run_id = ? ORDER BY position",
                (run_id,),
            ).fetchall()
        return RunRecord(
            method=r["method"],
            label=r["label"],
            family=r["family"],
            taskset=r["taskset"],
            config=json.loads(r["config_json"]),
            scores=[
                TaskScore(
                    x["task"],
                    x["metric"],
                    float("nan") if x["value"] is None else x["value"],
                    x["split"],
                )
                for x in s
            ],
            merge_seconds=r["merge_seconds"] or 0.0,
            eval_seconds=r["eval_seconds"] or 0.0,
            peak_rss_bytes=r["peak_rss_bytes"] or 0,
            artifact_bytes=r["artifact_bytes"] or 0,
            extra=json.loads(r["extra_json"]),
        )


def _finite_or_none(value: float) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


def _filters(**conds: str | None) -> tuple[str, list[str]]:
    """A WHERE clause over fixed column names (never user text) with bound values."""
    clauses, args = [], []
    for col, val in conds.items():
        if val is not None:
            clauses.append(f"{col} = ?")
            args.append(val)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), args
