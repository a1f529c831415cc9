"""The runs store's interface (`Store`): what every backend offers, and the reading queries
they share.

The runs store is the database of scores: a row per run (its resolved config, hash, label,
cost, provenance) and a row per (run, task, metric, split). It is not to be confused with
`mergebench.results`, the merge artifacts on disk.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergebench.report.records import RunRecord, TaskScore
from mergebench.report.store.identity import jsonable, record_hash
from mergebench.report.store.urls import redact_secrets
from mergebench.util.errors import MergeBenchError


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


class Store:
    """The runs store interface; `SQLiteStore` and `PostgresStore` implement it.

    Backends give `_query` (read, one dict per row; SQL with `?` placeholders) and
    `_replace_run` (one transaction); the rest is shared. `location` names the store in
    messages (a path, or a URL without its password); `readonly` stores never create or
    change anything. `volatile_keys`: the config keys (dotted paths) a run's hash leaves
    out, handed in by whoever opens the store (the benchmark's, for its jobs).
    """

    location: str = ""
    readonly: bool = False
    backend: str = ""
    volatile_keys: frozenset[str] = frozenset()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _replace_run(self, key: str, row: tuple[Any, ...], scores: list[tuple[Any, ...]]) -> int:
        """In one transaction: delete the run stored under `key`, insert `row` (in
        `RUN_COLUMNS` order) and its `scores` (less their run id); the new run id."""
        raise NotImplementedError

    def record_hash(self, record: RunRecord) -> str:
        """The key `record` is stored under here (its config less `volatile_keys`, its label)."""
        return record_hash(record, volatile=self.volatile_keys)

    def add_run(
        self, record: RunRecord, config_hash_: str | None = None, sweep_id: str | None = None
    ) -> int:
        """Store `record` and its scores in one transaction and return its run id.

        The key is `config_hash_`, else `self.record_hash(record)`. A record whose hash is
        already stored replaces the old one (that is what `force=true` asks for), so the
        store never holds two results for one config.
        """
        if self.readonly:
            raise MergeBenchError(f"store {self.location}: opened read-only")
        key = config_hash_ or self.record_hash(record)
        row, scores = self._run_values(record, key, sweep_id)
        return self._replace_run(key, row, scores)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    @staticmethod
    def _run_values(
        record: RunRecord, key: str, sweep_id: str | None
    ) -> tuple[tuple[Any, ...], list[tuple[int, str, str, str, float | None]]]:
        """The `runs` row (in `RUN_COLUMNS` order) and the score rows less their run id."""
        seen: set[tuple[str, str, str]] = set()
        for s in record.scores:
            ident = (s.task, s.metric, s.split)
            if ident in seen:
                raise MergeBenchError(
                    f"run {record.label!r}: score for task {s.task!r} metric {s.metric!r} "
                    f"split {s.split!r} given twice"
                )
            seen.add(ident)
        extra = jsonable(record.extra)
        sweep = sweep_id if sweep_id is not None else extra.get("sweep_id")
        row = (
            key,
            record.method,
            record.label,
            record.family,
            record.taskset,
            # a password in the config (a store URL) is never stored
            json.dumps(redact_secrets(jsonable(record.config)), sort_keys=True, ensure_ascii=False),
            package_version(),
            git_commit(),
            _now(),
            float(record.merge_seconds),
            float(record.eval_seconds),
            int(record.peak_rss_bytes),
            int(record.artifact_bytes),
            sweep,
            json.dumps(extra, sort_keys=True, ensure_ascii=False),
        )
        scores = [
            (i, s.task, s.metric, s.split, _finite_or_none(s.value))
            for i, s in enumerate(record.scores)
        ]
        return row, scores

    # -- reading --------------------------------------------------------------------------
    def has_run(self, config_hash_: str) -> bool:
        return bool(self._query("SELECT 1 AS hit FROM runs WHERE config_hash = ?", (config_hash_,)))

    def runs(
        self,
        family: str | None = None,
        taskset: str | None = None,
        method: str | None = None,
        sweep_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Run rows (oldest first) with `config` and `extra` decoded from JSON."""
        where, args = _filters(family=family, taskset=taskset, method=method, sweep_id=sweep_id)
        out = []
        for d in self._query(f"SELECT * FROM runs {where} ORDER BY run_id", args):
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
        return self._query(sql, args)

    def settings(self) -> list[tuple[str, str]]:
        """The (family, task set) pairs that have stored runs, sorted."""
        rows = self._query("SELECT DISTINCT family, taskset FROM runs")
        return sorted((r["family"], r["taskset"]) for r in rows)

    def get_record(self, run_id: int) -> RunRecord:
        """Rebuild the RunRecord of a stored run (for re-logging or exporting)."""
        found = self._query("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not found:
            raise MergeBenchError(f"store {self.location}: no run with id {run_id}")
        r = found[0]
        s = self._query(
            "SELECT task, metric, split, value FROM scores WHERE run_id = ? ORDER BY position",
            (run_id,),
        )
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


def not_a_store(location: str, why: str = "") -> MergeBenchError:
    """The one-line error for a file or database that mergebench did not create."""
    return MergeBenchError(
        f"{location}: not a mergebench results database{f' ({why})' if why else ''}"
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
