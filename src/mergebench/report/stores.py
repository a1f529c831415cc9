"""Opening a results store by path or URL: SQLite on one machine, PostgreSQL across nodes.

Its own module so that both backends (`store`, `store_postgres`) import one way: the
PostgreSQL backend builds on the SQLite module's shared `Store` base.
"""

from __future__ import annotations

import os

from mergebench.report.store import (
    DEFAULT_DB,
    POSTGRES_SCHEMES,
    SQLiteStore,
    Store,
    is_url,
    redact_url,
    sqlite_path,
)
from mergebench.report.store_postgres import PostgresStore
from mergebench.util.errors import MergeBenchError


def open_store(
    target: str | os.PathLike[str] | Store = DEFAULT_DB,
    *,
    readonly: bool = False,
    allow_network_fs: bool = False,
    timeout_s: float = 60.0,
) -> Store:
    """The store at a path (SQLite), `sqlite:///path` or `postgresql://user@host:port/db`.

    `readonly` opens an existing store for reading only (never creates a table); otherwise
    the schema is created if missing. A `Store` is returned as it is.
    """
    if isinstance(target, Store):
        return target
    if not is_url(target):
        return SQLiteStore(target, timeout_s, readonly=readonly, allow_network_fs=allow_network_fs)
    text = str(target)
    scheme = text.split("://", 1)[0].lower()
    if scheme in POSTGRES_SCHEMES:
        return PostgresStore(text, readonly=readonly, timeout_s=timeout_s)
    if scheme == "sqlite":
        return SQLiteStore(
            sqlite_path(text), timeout_s, readonly=readonly, allow_network_fs=allow_network_fs
        )
    raise MergeBenchError(
        f"store {redact_url(text)}: unknown scheme {scheme}://; expected a path, "
        "sqlite:///path or postgresql://user@host:port/db"
    )
