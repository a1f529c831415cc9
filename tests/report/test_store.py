"""The SQLite results store: hashing, records, resume, concurrent writers, opening for
reading (read-only, never creating tables) and store URLs."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mergebench.bench.identity import VOLATILE_KEYS
from mergebench.report.records import RunRecord, TaskScore
from mergebench.report.store import (
    SQLiteStore,
    config_hash,
    open_store,
    record_hash,
    redact_url,
)
from mergebench.util.errors import MergeBenchError


def bench_hash(config, label=None) -> str:
    """The hash the benchmark stores a run under (its volatile keys left out)."""
    return config_hash(config, label, volatile=VOLATILE_KEYS)


def make_record(label: str = "ties", scaling: float = 0.3, **kw) -> RunRecord:
    config = {
        "method": {"name": label, "scaling": scaling},
        "model": {"name": "tiny"},
        "taskset": {"name": "two", "tasks": ["a", "b"]},
        "logger": {"name": "none"},
        "force": False,
    }
    defaults = dict(
        method=label,
        label=label,
        family="tiny",
        taskset="two",
        config=config,
        scores=[
            TaskScore("a", "accuracy", 0.75),
            TaskScore("a", "f1", 0.5),
            TaskScore("b", "accuracy", 0.25),
        ],
        merge_seconds=1.5,
        peak_rss_bytes=123,
        artifact_bytes=456,
    )
    defaults.update(kw)
    return RunRecord(**defaults)


def test_hash_ignores_volatile_keys_and_key_order() -> None:
    a = {"method": {"name": "ties", "k": 0.2}, "force": False, "logger": {"name": "none"}}
    b = {"logger": {"name": "wandb"}, "force": True, "method": {"k": 0.2, "name": "ties"}}
    c = {"method": {"name": "ties", "k": 0.3}}
    assert bench_hash(a) == bench_hash(b)
    assert bench_hash(a) != bench_hash(c)
    assert bench_hash(a, label="individual") != bench_hash(a, label="pretrained")
    assert len(bench_hash(a)) == 64
    # nested cache locations do not matter, nested settings do
    z1 = {"zoo": {"dir": "/a", "multitask": True}, "store": {"path": "x.sqlite"}}
    z2 = {"zoo": {"dir": "/b", "multitask": True, "workers": 2}, "store": {"path": "y.sqlite"}}
    z3 = {"zoo": {"dir": "/a", "multitask": False}}
    assert bench_hash(z1) == bench_hash(z2) != bench_hash(z3)


def test_hash_of_omegaconf_equals_hash_of_plain_dict() -> None:
    from omegaconf import OmegaConf

    plain = {"method": {"name": "emr", "mask": True}, "x": "${method.name}"}
    assert bench_hash(OmegaConf.create(plain)) == bench_hash(
        {"method": {"name": "emr", "mask": True}, "x": "emr"}
    )


def test_add_run_roundtrip_and_metadata(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "sub" / "r.sqlite")
    rec = make_record()
    assert not store.has_run(store.record_hash(rec))
    run_id = store.add_run(rec, sweep_id="sweep-1")
    assert store.has_run(store.record_hash(rec))

    (run,) = store.runs()
    assert run["run_id"] == run_id
    assert run["config"]["method"] == {"name": "ties", "scaling": 0.3}
    assert run["sweep_id"] == "sweep-1"
    assert run["merge_seconds"] == 1.5 and run["artifact_bytes"] == 456
    assert run["peak_rss_bytes"] == 123 and run["version"]

    scores = store.scores()
    assert [(s["task"], s["metric"], s["value"]) for s in scores] == [
        ("a", "accuracy", 0.75),
        ("a", "f1", 0.5),
        ("b", "accuracy", 0.25),
    ]
    back = store.get_record(run_id)
    assert back.scores == rec.scores and back.label == rec.label


def test_same_hash_replaces_instead_of_duplicating(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "r.sqlite")
    store.add_run(make_record())
    newer = make_record(scores=[TaskScore("a", "accuracy", 0.9)])
    store.add_run(newer)
    assert len(store.runs()) == 1
    assert [s["value"] for s in store.scores()] == [0.9]


def test_filters_and_validation_split(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "r.sqlite")
    store.add_run(make_record("ties"))
    store.add_run(make_record("emr", family="other"))
    store.add_run(make_record("ta", scores=[TaskScore("a", "accuracy", 0.6, split="validation")]))
    assert {r["label"] for r in store.runs(family="tiny")} == {"ties", "ta"}
    assert {s["label"] for s in store.scores()} == {"ties", "emr"}  # test split by default
    assert [s["value"] for s in store.scores(split="validation")] == [0.6]


def test_duplicate_score_is_rejected_and_nothing_written(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "r.sqlite")
    bad = make_record(scores=[TaskScore("a", "accuracy", 0.1), TaskScore("a", "accuracy", 0.2)])
    with pytest.raises(MergeBenchError, match="given twice"):
        store.add_run(bad)
    assert store.runs() == []


def test_not_a_database_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "junk.sqlite"
    path.write_text("this is not sqlite " * 100)
    with pytest.raises(MergeBenchError, match="junk.sqlite"):
        SQLiteStore(path)


def test_wal_mode(tmp_path) -> None:
    path = tmp_path / "r.sqlite"
    SQLiteStore(path)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


_WRITER = """
import sys
from mergebench.report.records import RunRecord, TaskScore
from mergebench.report.store import SQLiteStore
path, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = SQLiteStore(path)
for i in range(n):
    store.add_run(RunRecord(
        method="ties", label=f"w{worker}", family="minilm", taskset="text",
        config={"method": {"name": "ties", "scaling": float(i)}, "worker": worker},
        scores=[TaskScore(t, "accuracy", 0.5) for t in ("a", "b", "c")],
    ))
"""


def test_concurrent_writers_lose_nothing(tmp_path) -> None:
    """Four writer processes at once. Separate interpreters that never import torch (no
    fork after torch is loaded: that can hang on a busy machine)."""
    path = str(tmp_path / "r.sqlite")
    SQLiteStore(path)  # the schema exists before the writers race
    code = _LIGHT_IMPORTS + _WRITER
    procs = [
        subprocess.Popen([sys.executable, "-c", code, path, str(w), "15"], stderr=subprocess.PIPE)
        for w in range(4)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    store = SQLiteStore(path)
    runs = store.runs()
    assert len(runs) == 60
    assert {r["label"] for r in runs} == {"w0", "w1", "w2", "w3"}
    assert len(store.scores()) == 60 * 3


# -- opening: URLs, read-only, databases mergebench did not create ------------------------
def test_open_store_paths_and_urls(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert isinstance(open_store("a.sqlite"), SQLiteStore)
    assert open_store("sqlite:///rel/b.sqlite").path == Path("rel/b.sqlite")
    assert (tmp_path / "rel" / "b.sqlite").is_file()
    absolute = tmp_path / "abs.sqlite"
    assert open_store(f"sqlite:///{absolute}").path == absolute  # sqlite:////tmp/...
    store = open_store(tmp_path / "c.sqlite")
    assert open_store(store) is store
    with pytest.raises(MergeBenchError, match="unknown scheme mysql://"):
        open_store("mysql://u:pw@h/db")
    with pytest.raises(MergeBenchError, match="sqlite:///relative/path"):
        open_store("sqlite://")
    assert redact_url("postgresql://me:secret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert redact_url("postgresql://me@db/x") == "postgresql://me@db/x"


def test_reading_an_empty_file_creates_nothing(tmp_path) -> None:
    path = tmp_path / "empty.sqlite"
    path.touch()
    with pytest.raises(MergeBenchError, match="empty.sqlite: not a mergebench results database"):
        open_store(path, readonly=True)
    assert path.stat().st_size == 0


def test_another_applications_database_is_left_alone(tmp_path) -> None:
    path = tmp_path / "app.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    con.commit()
    con.close()
    before = path.read_bytes()
    for readonly in (True, False):  # reading, and writing too: never add tables to it
        with pytest.raises(MergeBenchError, match="not a mergebench results database.*users"):
            open_store(path, readonly=readonly)
    assert path.read_bytes() == before


def test_readonly_store_reads_and_refuses_writes(tmp_path) -> None:
    path = tmp_path / "r.sqlite"
    SQLiteStore(path).add_run(make_record())
    reader = open_store(path, readonly=True)
    assert [r["label"] for r in reader.runs()] == ["ties"]
    assert reader.settings() == [("tiny", "two")]
    with pytest.raises(MergeBenchError, match="read-only"):
        reader.add_run(make_record("emr"))
    with pytest.raises(MergeBenchError, match="no results database"):
        open_store(tmp_path / "missing.sqlite", readonly=True)
    assert not (tmp_path / "missing.sqlite").exists()


# Subprocesses that only read the store skip the package's __init__ (it imports torch and
# every method: seconds per process on a busy machine).
_LIGHT_IMPORTS = (
    "import importlib.util, sys, types\n"
    "_pkg = types.ModuleType('mergebench')\n"
    "_pkg.__path__ = list(importlib.util.find_spec('mergebench').submodule_search_locations)\n"
    "sys.modules['mergebench'] = _pkg\n"
)


def _readonly_mount_run(folder: Path, code: str) -> subprocess.CompletedProcess:
    """Run `code` with `folder` read-only: a private read-only bind mount as root (in its own
    mount namespace), else file permissions."""
    python = [sys.executable, "-c", _LIGHT_IMPORTS + code]
    if os.geteuid() != 0:
        for p in folder.iterdir():
            p.chmod(0o444)
        folder.chmod(0o555)
        try:
            return subprocess.run(python, capture_output=True, text=True, timeout=120)
        finally:
            folder.chmod(0o755)
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to make a read-only mount")
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(folder), *python],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "mount" in out.stderr and "permission denied" in out.stderr.lower():
        pytest.skip(f"cannot make a read-only mount here: {out.stderr.strip()}")
    return out


def test_reads_a_database_on_a_read_only_mount(tmp_path) -> None:
    folder = tmp_path / "ro"
    store = SQLiteStore(folder / "r.sqlite")
    store.add_run(make_record())
    store.add_run(make_record("emr"))
    code = (
        "import sys\n"
        "from mergebench.report.store import open_store\n"
        "try:\n"
        f"    open({str(folder / 'probe')!r}, 'w')\n"
        "    sys.exit('the folder is writable')\n"
        "except OSError:\n"
        "    pass\n"
        f"s = open_store({str(folder / 'r.sqlite')!r}, readonly=True)\n"
        "print(sorted(r['label'] for r in s.runs()), len(s.scores()))\n"
    )
    out = _readonly_mount_run(folder, code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['emr', 'ties'] 6"


# -- stores written before stay valid: the hash and the tables may not drift -----------------
PINNED_CONFIG = {
    "method": {"name": "ties", "k": 0.2, "scaling": 0.3},
    "model": {"name": "minilm"},
    "taskset": {"name": "glue", "tasks": ["sst2", "rte"]},
    "seed": 0,
    "zoo": {"dir": "/tmp/zoo", "workers": 4, "build_missing": True, "epochs": 3},
    "eval": {"batch_size": 64, "max_examples": 500},
    "threads": 8,
    "logger": {"name": "wandb"},
    "hydra": {"run": {"dir": "x"}},
    "store": {"url": "sqlite:///x"},
    "force": True,
    "nan": float("nan"),
}
# Digests computed before the store became a package (commit 1155619): a change here means
# every stored run would be re-run instead of resumed.
PINNED_HASH = "6a177e7e66d316781e6a58ffe3f9bd4703fe67e8598ec78b9604e74d7ef7d073"
PINNED_HASH_INDIVIDUAL = "cf173a26cd4168f16cff09141d6e8985a7367085241ab259f0f3af98f044fe3c"

# The tables exactly as the SQLite store created them before the schema was declared once.
LEGACY_SQLITE_SCHEMA = """
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
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_a_fixed_config_keeps_its_hash() -> None:
    assert bench_hash(PINNED_CONFIG) == PINNED_HASH
    assert bench_hash(PINNED_CONFIG, label="individual") == PINNED_HASH_INDIVIDUAL
    record = make_record(config=PINNED_CONFIG, label="individual")
    assert record_hash(record, volatile=VOLATILE_KEYS) == PINNED_HASH_INDIVIDUAL


def table_shape(path: Path) -> dict[str, list]:
    con = sqlite3.connect(path)
    try:
        shape = {}
        for table in ("meta", "runs", "scores"):
            shape[table] = [
                con.execute(f"PRAGMA table_info({table})").fetchall(),
                con.execute(f"PRAGMA foreign_key_list({table})").fetchall(),
                [r[1:] for r in con.execute(f"PRAGMA index_list({table})").fetchall()],
            ]
        autoinc = "SELECT sql LIKE '%AUTOINCREMENT%' FROM sqlite_master WHERE name = 'runs'"
        shape["autoincrement"] = con.execute(autoinc).fetchall()
        shape["index"] = con.execute("PRAGMA index_info(runs_by_setting)").fetchall()
        return shape
    finally:
        con.close()


def test_a_store_written_before_resumes(tmp_path) -> None:
    legacy = tmp_path / "legacy.sqlite"
    con = sqlite3.connect(legacy)
    con.executescript(LEGACY_SQLITE_SCHEMA)
    con.execute(
        "INSERT INTO runs (config_hash, method, label, family, taskset, config_json, "
        "created_at) VALUES (?, 'individual', 'individual', 'tiny', 'two', '{}', '2025-01-01')",
        (PINNED_HASH_INDIVIDUAL,),
    )
    con.commit()
    con.close()
    fresh = tmp_path / "fresh.sqlite"
    SQLiteStore(fresh)
    assert table_shape(fresh) == table_shape(legacy)  # one schema, rendered as before
    store = open_store(legacy, volatile_keys=VOLATILE_KEYS)
    record = make_record(config=PINNED_CONFIG, label="individual")
    assert store.has_run(store.record_hash(record))  # found by its hash: resumed, not re-run
    store.add_run(record)  # force=true replaces it
    (run,) = store.runs()
    assert run["config_hash"] == PINNED_HASH_INDIVIDUAL and run["run_id"] == 2
