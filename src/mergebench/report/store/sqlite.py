"""The SQLite runs store: one file on one machine, shared by the jobs of a sweep.

Several Hydra multirun jobs (joblib processes, SLURM array tasks on one node) write to the
same file at once. It runs in WAL mode with a generous busy timeout, and every write is one
short `BEGIN IMMEDIATE` transaction; WAL needs shared memory between the writers, which a
network file system does not give, so a database on NFS, Lustre, CIFS... is refused (see
`mounts.network_fs_type`) unless `allow_network_fs` is set (then: rollback journal, at the
user's risk).

Reading only (`readonly=True`, the leaderboard) creates and changes nothing, not even the
`-wal`/`-shm` files SQLite keeps beside a WAL database: see `SQLiteStore._read_connection`.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from mergebench.report.store.base import Store, not_a_store
from mergebench.report.store.mounts import network_fs_type
from mergebench.report.store.schema import (
    INSERT_RUN,
    INSERT_SCORE,
    SCHEMA_VERSION,
    create_statements,
)
from mergebench.util.errors import MergeBenchError

DEFAULT_DB = Path("outputs") / "results.sqlite"
T = TypeVar("T")


class SQLiteStore(Store):
    """Runs store in the SQLite file at `path` (created on first use, parent folders too).

    `readonly=True` (the leaderboard) opens an existing file and creates nothing; a file
    without mergebench's tables is reported as not a runs store. A database on a network file
    system is refused for writing unless `allow_network_fs`, which then uses the rollback
    journal instead of WAL (safe only with working POSIX locks on that file system, at the
    user's risk). `volatile_keys`: see `Store`. `mountinfo` replaces /proc/self/mountinfo in
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
        volatile_keys: Collection[str] = (),
        mountinfo: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.timeout_s = timeout_s
        self.readonly = readonly
        self.volatile_keys = frozenset(volatile_keys)
        self._ro_mount = False
        if self.path.exists() and self.path.is_dir():
            raise MergeBenchError(f"store path {self.path}: is a directory, expected a file")
        if readonly:
            if not self.path.is_file():
                raise MergeBenchError(f"store {self.path}: no results database there")
            if self.path.stat().st_size == 0:
                raise not_a_store(self.location, "empty file")
            self._read(self._check_schema)
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
    def _open(self, immutable: bool) -> sqlite3.Connection:
        if not self.readonly:
            return sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        uri = "file:" + quote(str(self.path.resolve())) + "?mode=ro"
        if immutable:
            uri += "&immutable=1"
        return sqlite3.connect(uri, uri=True, timeout=self.timeout_s, isolation_level=None)

    @contextmanager
    def _connect(self, immutable: bool = False) -> Iterator[sqlite3.Connection]:
        immutable = immutable or self._ro_mount
        try:
            con = self._open(immutable)
            if self.readonly and not immutable:
                try:
                    con.execute("SELECT count(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError:
                    # A WAL database on a read-only mount without its -shm file cannot be
                    # opened normally; nobody can write there, so reading it as immutable
                    # is exact.
                    con.close()
                    self._ro_mount = True
                    con = self._open(True)
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

    # -- reading without side effects ------------------------------------------------------
    def _sidecars(self) -> bool:
        """Whether a `-wal`, `-shm` or `-journal` file lies beside the database: a connection
        is open (or a writer died), so the file alone may not hold every commit."""
        return any(Path(f"{self.path}{end}").exists() for end in ("-wal", "-shm", "-journal"))

    def _stamp(self) -> tuple[int, ...]:
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(connection)` on a read-only connection that leaves nothing behind.

        SQLite's `mode=ro` creates `-wal`/`-shm` files beside a WAL database and, read-only,
        cannot remove them. While no such file exists no connection is open and the file
        holds every commit, so it is read as immutable (nothing created); if it changed
        meanwhile (a writer started) the read is repeated the normal way, beside the
        writer's own files.
        """
        if not self._sidecars():
            before = self._stamp()
            try:
                with self._connect(immutable=True) as con:
                    out = fn(con)
            except MergeBenchError:
                if self._stamp() == before and not self._sidecars():
                    raise
            else:
                if self._stamp() == before and not self._sidecars():
                    return out
        with self._connect() as con:
            return fn(con)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        def rows(con: sqlite3.Connection) -> list[dict[str, Any]]:
            return [dict(r) for r in con.execute(sql, tuple(args)).fetchall()]

        if self.readonly:
            return self._read(rows)
        with self._connect() as con:
            return rows(con)

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
                for statement in create_statements("sqlite"):
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
    def _replace_run(self, key: str, row: tuple[Any, ...], scores: list[tuple[Any, ...]]) -> int:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute("DELETE FROM runs WHERE config_hash = ?", (key,))
                run_id = int(con.execute(INSERT_RUN, row).lastrowid)
                con.executemany(INSERT_SCORE, [(run_id, *s) for s in scores])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return run_id
