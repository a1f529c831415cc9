"""The PostgreSQL runs store: the same tables and semantics as the SQLite store, for
sweeps whose jobs run on several nodes (SQLite's WAL needs one machine's shared memory).

`psycopg` (version 3, the optional extra `postgres`) is imported when a store is opened, so
the rest of mergebench does not need it. Every call opens a short-lived connection (jobs are
separate processes, often forked or spawned by a launcher, so none is held across calls).

Concurrent writers: `add_run` is one transaction that first takes a transaction-scoped
advisory lock on the run's config hash, then deletes a stored run with that hash (its scores
go with it, ON DELETE CASCADE) and inserts the run and its scores. Two jobs storing the same
hash therefore run one after the other: the second, at READ COMMITTED, sees the first one's
committed row in its DELETE and replaces it; no duplicate, no lost run, and a replaced run
gets a new (larger) run id, as in SQLite, so the leaderboard's "latest run wins" holds.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from mergebench.report.store.base import Store, not_a_store
from mergebench.report.store.schema import (
    INSERT_RUN,
    INSERT_SCORE,
    SCHEMA_VERSION,
    create_statements,
)
from mergebench.report.store.urls import passwords_in, redact
from mergebench.util.errors import MergeBenchError, first_line

# First key of every advisory lock mergebench takes ("mb"), so that its locks do not collide
# with another application's in the same database; the second is hashtext(config hash), or
# 0 for creating the schema.
_LOCK_NAMESPACE = 0x6D62


def _pg(sql: str) -> str:
    """The shared SQL text uses `?` placeholders; psycopg wants `%s`."""
    return sql.replace("?", "%s")


def _psycopg():
    try:
        import psycopg
    except ImportError as exc:
        raise MergeBenchError(
            "a postgresql:// store needs psycopg: pip install -e '.[postgres]'"
        ) from exc
    return psycopg


class PostgresStore(Store):
    """Runs store in the PostgreSQL database at `url` (`postgresql://user[:pw]@host:port/db`,
    or any libpq connection string). The database must exist; the tables are created on
    first use unless `readonly`. `volatile_keys`: see `Store`. No message shows the
    password, not even the driver's own (which may echo a URL it cannot parse)."""

    backend = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        readonly: bool = False,
        timeout_s: float = 60.0,
        volatile_keys: Collection[str] = (),
    ) -> None:
        self.url = url.replace("postgresql+psycopg2://", "postgresql://", 1).replace(
            "postgresql+psycopg://", "postgresql://", 1
        )
        self._secrets = passwords_in(self.url)
        self.location = redact(self.url, self._secrets)
        self.readonly = readonly
        self.volatile_keys = frozenset(volatile_keys)
        self.timeout_s = timeout_s
        self._psycopg = _psycopg()
        with self._connect(autocommit=True) as con:
            if readonly:
                if not self._schema_ok(con):
                    raise not_a_store(self.location, "no mergebench tables")
            elif not self._schema_ok(con):
                self._create_schema(con)

    @contextmanager
    def _connect(self, autocommit: bool) -> Iterator[Any]:
        psycopg = self._psycopg
        from psycopg.rows import dict_row

        try:
            con = psycopg.connect(
                self.url,
                autocommit=autocommit,
                row_factory=dict_row,
                connect_timeout=max(1, int(self.timeout_s)),
                application_name="mergebench",
            )
        except psycopg.Error as exc:
            raise MergeBenchError(
                f"store {self.location}: cannot connect ({redact(first_line(exc), self._secrets)})"
            ) from None  # the driver's exception may hold the password
        try:
            if self.readonly:
                con.read_only = True
            yield con
        except psycopg.Error as exc:
            why = redact(first_line(exc), self._secrets)
            raise MergeBenchError(f"store {self.location}: {why}") from None
        finally:
            con.close()

    def _schema_ok(self, con: Any) -> bool:
        """Whether the mergebench tables exist (raises for another application's tables or
        another schema version)."""
        row = con.execute(
            "SELECT to_regclass('meta') IS NOT NULL AS meta, to_regclass('runs') IS NOT NULL "
            "AS runs, to_regclass('scores') IS NOT NULL AS scores"
        ).fetchone()
        if not any(row.values()):
            return False
        version = None
        if row["meta"]:
            found = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = found["value"] if found else None
        if version is None or not (row["runs"] and row["scores"]):
            raise not_a_store(self.location, "tables named meta/runs/scores that are not ours")
        if int(version) != SCHEMA_VERSION:
            raise MergeBenchError(
                f"store {self.location}: schema version {version}, this mergebench reads "
                f"{SCHEMA_VERSION} (use another database)"
            )
        return True

    def _create_schema(self, con: Any) -> None:
        # Concurrent CREATE TABLE IF NOT EXISTS can still collide in PostgreSQL's catalogs:
        # the first job creates the tables under a lock, the others then find them.
        with con.transaction():
            con.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_NAMESPACE,))
            if self._schema_ok(con):
                return
            for statement in create_statements("postgresql"):
                con.execute(statement)
            con.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', %s)",
                (str(SCHEMA_VERSION),),
            )

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._connect(autocommit=True) as con:
            return con.execute(_pg(sql), tuple(args)).fetchall()

    def _replace_run(self, key: str, row: tuple[Any, ...], scores: list[tuple[Any, ...]]) -> int:
        with self._connect(autocommit=False) as con, con.transaction():
            con.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_NAMESPACE, key))
            con.execute("DELETE FROM runs WHERE config_hash = %s", (key,))
            run_id = int(
                con.execute(_pg(INSERT_RUN) + " RETURNING run_id", row).fetchone()["run_id"]
            )
            if scores:
                with con.cursor() as cur:
                    cur.executemany(_pg(INSERT_SCORE), [(run_id, *s) for s in scores])
        return run_id
