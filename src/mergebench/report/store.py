"""The results store: a database with a row per run and a row per (run, task, metric).

Two backends share one interface (`Store`): SQLite (`SQLiteStore`, also named `ResultsStore`,
the default on one machine) and PostgreSQL (`PostgresStore` in `store_postgres`, for sweeps
whose jobs run on several nodes). `open_store(url_or_path)` picks one: a plain path or
`sqlite:///path` means SQLite, `postgresql://user@host:port/db` means PostgreSQL.

Several Hydra multirun jobs (joblib processes, SLURM array tasks) write to the same store at
once. SQLite runs in WAL mode with a generous busy timeout, and every write is one short
`BEGIN IMMEDIATE` transaction; WAL needs shared memory between the writers, which a network
file system does not give, so SQLite refuses a database on NFS, Lustre, CIFS... (see
`network_fs_type`) unless `allow_network_fs` is set (then: rollback journal, at the user's
risk). A run is identified by the hash of its resolved config (minus keys that do not change
results, such as output paths or the logger), so a sweep that was interrupted can skip what
is already stored and resume where it stopped.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import sqlite3
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from mergebench.report.records import RunRecord, TaskScore
from mergebench.util.errors import MergeBenchError
from mergebench.util.hashing import stable_hash

DEFAULT_DB = Path("outputs") / "results.sqlite"

# Config keys (dotted paths) that say where and how a run reports or where caches live, not
# what it computes: runs that differ only in these share a hash, so a resumed sweep skips them.
# `model._target_` and `model.source` name the code that reads a model config (added after
# runs were stored: a run's identity is its model's name, checkpoints and options).
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
        "threads",
        "device",
        "wandb",
        "sweep_id",
        "num_workers",
        "references",
        "model._target_",
        "model.source",
        "zoo.dir",
        "zoo.build_missing",
        "zoo.workers",
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
    return stable_hash(payload)  # canonical JSON: the same digest as stores written before


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


# -- what every backend offers --------------------------------------------------------------
_RUN_COLUMNS = (
    "config_hash",
    "method",
    "label",
    "family",
    "taskset",
    "config_json",
    "version",
    "git_commit",
    "created_at",
    "merge_seconds",
    "eval_seconds",
    "peak_rss_bytes",
    "artifact_bytes",
    "sweep_id",
    "extra_json",
)
_INSERT_RUN = (
    f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({', '.join('?' for _ in _RUN_COLUMNS)})"
)
_INSERT_SCORE = (
    "INSERT INTO scores (run_id, position, task, metric, split, value) VALUES (?, ?, ?, ?, ?, ?)"
)


class Store:
    """The results store interface; `SQLiteStore` and `PostgresStore` implement it.

    Backends give `_query` (read, one dict per row; SQL with `?` placeholders) and `add_run`;
    the reading methods are shared. `location` names the store in messages (a path, or a URL
    without its password); `readonly` stores never create or change anything.
    """

    location: str = ""
    readonly: bool = False
    backend: str = ""

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    def add_run(
        self, record: RunRecord, config_hash_: str | None = None, sweep_id: str | None = None
    ) -> int:
        """Store `record` and its scores in one transaction and return its run id.

        A record whose hash is already stored replaces the old one (that is what `force=true`
        asks for), so the store never holds two results for one config.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    # -- shared writing helpers ----------------------------------------------------------
    def _writable(self) -> None:
        if self.readonly:
            raise MergeBenchError(f"store {self.location}: opened read-only")

    @staticmethod
    def _run_values(
        record: RunRecord, key: str, sweep_id: str | None
    ) -> tuple[tuple[Any, ...], list[tuple[int, str, str, str, float | None]]]:
        """The `runs` row (in `_RUN_COLUMNS` order) and the score rows less their run id."""
        seen: set[tuple[str, str, str]] = set()
        for s in record.scores:
            ident = (s.task, s.metric, s.split)
            if ident in seen:
                raise MergeBenchError(
                    f"run {record.label!r}: score for task {s.task!r} metric {s.metric!r} "
                    f"split {s.split!r} given twice"
                )
            seen.add(ident)
        extra = _jsonable(record.extra)
        sweep = sweep_id if sweep_id is not None else extra.get("sweep_id")
        row = (
            key,
            record.method,
            record.label,
            record.family,
            record.taskset,
            json.dumps(_jsonable(record.config), sort_keys=True, ensure_ascii=False),
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


# -- network file systems -----------------------------------------------------------------
# File systems on which SQLite's WAL (shared memory between writers) and often its POSIX
# locks do not work across machines. FUSE file systems appear as `fuse.<name>`.
NETWORK_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb2",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "glusterfs",
        "gfs2",
        "ocfs2",
        "panfs",
        "wekafs",
        "orangefs",
        "pvfs2",
        "quobyte",
        "davfs",
    }
)
NETWORK_FUSE = frozenset(
    {
        "sshfs",
        "ceph",
        "cephfs",
        "glusterfs",
        "beegfs",
        "s3fs",
        "gcsfuse",
        "rclone",
        "juicefs",
        "lizardfs",
        "moosefs",
        "mfs",
        "seaweedfs",
        "davfs",
        "quobyte",
    }
)
_MOUNTINFO = Path("/proc/self/mountinfo")


def is_network_fs(fstype: str) -> bool:
    fstype = fstype.lower()
    if fstype.startswith("fuse."):
        return fstype[len("fuse.") :] in NETWORK_FUSE
    return fstype in NETWORK_FS


def _unescape_mount(field: str) -> str:
    """Mount points in mountinfo escape space, tab, newline and backslash as octal `\\NNN`."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, file system type) per line of /proc/<pid>/mountinfo, in mount order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or sep + 1 >= len(fields):
            continue
        mounts.append((_unescape_mount(fields[4]), fields[sep + 1]))
    return mounts


def network_fs_type(path: str | os.PathLike[str], mountinfo: str | None = None) -> str | None:
    """The file system type of the mount holding `path` if it is a network file system
    (nfs, cifs, lustre, gpfs, beegfs, ceph, fuse.sshfs...), else None.

    Reads /proc/self/mountinfo (or the `mountinfo` text given, for tests); where there is no
    such file (not Linux) it cannot tell and returns None. `path` need not exist yet: its
    nearest existing folder decides.
    """
    if mountinfo is None:
        try:
            mountinfo = _MOUNTINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    # Symbolic links are followed in the part of the path that exists; the rest (folders
    # the store would create) lies on the same mount.
    existing, rest = Path(os.path.abspath(path)), []
    while not existing.exists() and existing.parent != existing:
        rest.append(existing.name)
        existing = existing.parent
    resolved = str(existing.resolve().joinpath(*reversed(rest)))
    best: tuple[str, str] | None = None
    for mount_point, fstype in parse_mountinfo(mountinfo):
        base = mount_point.rstrip("/")
        inside = resolved == mount_point or resolved.startswith(base + "/") or mount_point == "/"
        # a later mount on the same point hides an earlier one, hence >=
        if inside and (best is None or len(mount_point) >= len(best[0])):
            best = (mount_point, fstype)
    if best is not None and is_network_fs(best[1]):
        return best[1]
    return None


# -- SQLite -------------------------------------------------------------------------------
class SQLiteStore(Store):
    """Results database at `path` (created on first use, parent directories included).

    `readonly=True` (the leaderboard) opens an existing file with `mode=ro` and creates
    nothing; a file without mergebench's tables is reported as not a results database. A
    database on a network file system is refused for writing unless `allow_network_fs`,
    which then uses the rollback journal instead of WAL (safe only with working POSIX locks
    on that file system, at the user's risk). `mountinfo` replaces /proc/self/mountinfo in
    tests.
    """

    backend = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_DB,
        timeout_s: float = 60.0,
        *,
        readonly: bool = False,
        allow_network_fs: bool = False,
        mountinfo: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.timeout_s = timeout_s
        self.readonly = readonly
        self._immutable = False
        if self.path.exists() and self.path.is_dir():
            raise MergeBenchError(f"store path {self.path}: is a directory, expected a file")
        if readonly:
            if not self.path.is_file():
                raise MergeBenchError(f"store {self.path}: no results database there")
            if self.path.stat().st_size == 0:
                raise not_a_store(self.location, "empty file")
            with self._connect() as con:
                self._check_schema(con)
            return
        fstype = network_fs_type(self.path, mountinfo)
        if fstype is not None and not allow_network_fs:
            raise MergeBenchError(
                f"store {self.path}: on a network file system ({fstype}), where SQLite's WAL "
                "can corrupt or lose results; use a PostgreSQL store "
                "(store.url=postgresql://user@host:5432/db) or store.allow_network_fs=true "
                "(SQLite with the rollback journal, at your own risk)"
            )
        self.journal_mode = "DELETE" if fstype is not None else "WAL"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            self._init_schema(con)

    # -- connection -----------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if not self.readonly:
            return sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        uri = "file:" + quote(str(self.path.resolve())) + "?mode=ro"
        if self._immutable:
            uri += "&immutable=1"
        return sqlite3.connect(uri, uri=True, timeout=self.timeout_s, isolation_level=None)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = self._open()
            if self.readonly and not self._immutable:
                try:
                    con.execute("SELECT count(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError:
                    # A WAL database on a read-only mount without its -shm file cannot be
                    # opened normally; nobody can write there, so reading it as immutable
                    # is exact.
                    con.close()
                    self._immutable = True
                    con = self._open()
        except sqlite3.Error as exc:
            raise MergeBenchError(f"store {self.path}: cannot open ({exc})") from exc
        try:
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            if not self.readonly:
                con.execute("PRAGMA foreign_keys = ON")
                # In WAL mode NORMAL never corrupts the file; a power cut may lose the last
                # commit (that run is then simply re-run on resume). FULL would fsync every
                # commit. The rollback journal (network file systems) keeps the default FULL.
                if self.journal_mode == "WAL":
                    con.execute("PRAGMA synchronous = NORMAL")
            yield con
        except sqlite3.DatabaseError as exc:
            if self.readonly and "not a database" in str(exc):
                raise not_a_store(self.location, str(exc)) from exc
            raise MergeBenchError(f"store {self.path}: {exc}") from exc
        finally:
            con.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._connect() as con:
            return [dict(r) for r in con.execute(sql, tuple(args)).fetchall()]

    def _check_schema(self, con: sqlite3.Connection, creating: bool = False) -> bool:
        """Whether the mergebench tables exist (raises for someone else's database or another
        schema version). `creating`: an empty database is fine (the caller creates them)."""
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables.discard("sqlite_sequence")
        if not tables and creating:
            return False
        if not {"meta", "runs", "scores"} <= tables:
            shown = ", ".join(sorted(tables)[:6]) or "none"
            raise not_a_store(self.location, f"its tables: {shown}")
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise not_a_store(self.location, "no schema_version in its meta table")
        if int(row[0]) != SCHEMA_VERSION:
            raise MergeBenchError(
                f"store {self.path}: schema version {row[0]}, this mergebench reads "
                f"{SCHEMA_VERSION} (use a new --db path)"
            )
        return True

    def _init_schema(self, con: sqlite3.Connection) -> None:
        # Someone else's database is refused before anything (even the journal mode) changes.
        self._check_schema(con, creating=True)
        # WAL lets readers (leaderboards) run while jobs write; the mode is stored in the file.
        con.execute(f"PRAGMA journal_mode = {self.journal_mode}")
        con.execute("BEGIN IMMEDIATE")
        try:
            if not self._check_schema(con, creating=True):
                # One statement at a time: executescript() would commit the open transaction.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    # -- writing --------------------------------------------------------------------------
    def add_run(
        self, record: RunRecord, config_hash_: str | None = None, sweep_id: str | None = None
    ) -> int:
        self._writable()
        key = config_hash_ or record_hash(record)
        row, scores = self._run_values(record, key, sweep_id)
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute("DELETE FROM runs WHERE config_hash = ?", (key,))
                run_id = int(con.execute(_INSERT_RUN, row).lastrowid)
                con.executemany(_INSERT_SCORE, [(run_id, *s) for s in scores])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return run_id


ResultsStore = SQLiteStore  # the name existing code and tests use


# -- choosing a backend -------------------------------------------------------------------
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2")


def redact_url(url: str) -> str:
    """`url` without its password (for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
    except ValueError:
        return url


def is_url(target: str | os.PathLike[str]) -> bool:
    return isinstance(target, str) and "://" in target


def sqlite_path(url: str) -> Path:
    """The file of a `sqlite:///relative/path` or `sqlite:////absolute/path` URL (the
    SQLAlchemy convention: what follows the third slash is the path)."""
    rest = url.split("://", 1)[1]
    if not rest.startswith("/") or len(rest) < 2:
        raise MergeBenchError(
            f"store {url}: expected sqlite:///relative/path or sqlite:////absolute/path"
        )
    return Path(unquote(rest[1:]))


def combined_results(
    stores: Sequence[Store],
    family: str | None = None,
    taskset: str | None = None,
    split: str | None = "test",
    with_runs: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`scores()` rows (and, `with_runs`, `runs()` rows) of several stores as if they were
    one. A run's identity is its config hash: a hash stored in several stores counts once,
    the latest `created_at` winning (on a tie, the store given later). With several stores
    the run ids are renumbered 1..n in `created_at` order, so "the latest run of a label
    wins" holds across stores; one store keeps its own ids."""
    if len(stores) == 1:
        (store,) = stores
        runs = store.runs(family=family, taskset=taskset) if with_runs else []
        return store.scores(family=family, taskset=taskset, split=split), runs
    score_sets = [s.scores(family=family, taskset=taskset, split=split) for s in stores]
    run_sets = [s.runs(family=family, taskset=taskset) if with_runs else [] for s in stores]
    latest: dict[str, tuple[str, int, int]] = {}
    for idx, rows in enumerate(score_sets):
        for r in rows:
            cand = (r["created_at"], idx, r["run_id"])
            old = latest.get(r["config_hash"])
            if old is None or cand > old:
                latest[r["config_hash"]] = cand
    new_id = {(idx, rid): n for n, (_, idx, rid) in enumerate(sorted(latest.values()), 1)}
    scores = [
        r | {"run_id": new_id[(idx, r["run_id"])]}
        for idx, rows in enumerate(score_sets)
        for r in rows
        if (idx, r["run_id"]) in new_id
    ]
    scores.sort(key=lambda r: (r["run_id"], r["position"]))
    runs = [
        r | {"run_id": new_id[(idx, r["run_id"])]}
        for idx, rows in enumerate(run_sets)
        for r in rows
        if (idx, r["run_id"]) in new_id
    ]
    runs.sort(key=lambda r: r["run_id"])
    return scores, runs


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
