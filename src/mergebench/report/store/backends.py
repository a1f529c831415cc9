"""Opening a runs store by path or URL: one class per URL scheme (`BACKENDS`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection

from mergebench.report.store.base import Store
from mergebench.report.store.postgres import PostgresStore
from mergebench.report.store.sqlite import DEFAULT_DB, SQLiteStore
from mergebench.report.store.urls import is_url, redact_url, scheme, sqlite_path
from mergebench.util.errors import MergeBenchError


def _sqlite(target: str, **options) -> Store:
    return SQLiteStore(sqlite_path(target), **options)


def _postgres(target: str, *, allow_network_fs: bool = False, **options) -> Store:
    return PostgresStore(target, **options)  # a server: no file system of ours to check


# URL scheme -> how to open it; a new backend adds its class and a row here.
BACKENDS: dict[str, Callable[..., Store]] = {
    "sqlite": _sqlite,
    "postgresql": _postgres,
    "postgres": _postgres,
    "postgresql+psycopg": _postgres,
    "postgresql+psycopg2": _postgres,
}


def open_store(
    target: str | os.PathLike[str] | Store = DEFAULT_DB,
    *,
    readonly: bool = False,
    allow_network_fs: bool = False,
    timeout_s: float = 60.0,
    volatile_keys: Collection[str] = (),
) -> Store:
    """The store at a path (SQLite), `sqlite:///path` or `postgresql://user@host:port/db`.

    `readonly` opens an existing store for reading only (never creates a table); otherwise
    the schema is created if missing. `volatile_keys`: the config keys a run's hash leaves
    out (see `Store`). A `Store` is returned as it is.
    """
    if isinstance(target, Store):
        return target
    options = dict(
        readonly=readonly,
        allow_network_fs=allow_network_fs,
        timeout_s=timeout_s,
        volatile_keys=volatile_keys,
    )
    if not is_url(target):
        return SQLiteStore(target, **options)
    text = str(target)
    opener = BACKENDS.get(scheme(text))
    if opener is None:
        raise MergeBenchError(
            f"store {redact_url(text)}: unknown scheme {scheme(text)}://; expected a path, "
            "sqlite:///path or postgresql://user@host:port/db"
        )
    return opener(text, **options)
