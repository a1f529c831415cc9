"""The runs store: the database of scores, a row per run and a row per (run, task, metric).

Not the merge artifacts (`mergebench.results`): this is where evaluated runs are recorded for
resuming sweeps, leaderboards and W&B. Modules, one job each:

- `identity`: the hash a run is stored under (config less the caller's volatile keys, label);
- `schema`: the tables, declared once, rendered per SQL dialect;
- `base`: the `Store` interface and the reading queries every backend shares;
- `sqlite`, `postgres`: the backends (one machine; several nodes);
- `mounts`: network file system detection (SQLite refuses to write there);
- `urls`: store URLs and password redaction;
- `combine`: several stores read as one;
- `backends`: `open_store`, a class per URL scheme.
"""

from mergebench.report.store.backends import BACKENDS, open_store
from mergebench.report.store.base import Store, not_a_store
from mergebench.report.store.combine import combined_results
from mergebench.report.store.identity import canonical_config, config_hash, record_hash
from mergebench.report.store.mounts import (
    NETWORK_FS,
    NETWORK_FUSE,
    is_network_fs,
    network_fs_type,
    parse_mountinfo,
)
from mergebench.report.store.postgres import PostgresStore
from mergebench.report.store.schema import SCHEMA_VERSION
from mergebench.report.store.sqlite import DEFAULT_DB, SQLiteStore
from mergebench.report.store.urls import is_url, redact, redact_secrets, redact_url, sqlite_path

__all__ = [
    "BACKENDS",
    "DEFAULT_DB",
    "NETWORK_FS",
    "NETWORK_FUSE",
    "SCHEMA_VERSION",
    "PostgresStore",
    "SQLiteStore",
    "Store",
    "canonical_config",
    "combined_results",
    "config_hash",
    "is_network_fs",
    "is_url",
    "network_fs_type",
    "not_a_store",
    "open_store",
    "parse_mountinfo",
    "record_hash",
    "redact",
    "redact_secrets",
    "redact_url",
    "sqlite_path",
]
