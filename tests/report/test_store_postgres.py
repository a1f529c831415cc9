"""The PostgreSQL results store against a real server started by the tests
(`conftest_postgres.py`), and concurrent sweep writers against both backends."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import time

import pytest

from mergebench.bench.identity import VOLATILE_KEYS
from mergebench.report.records import RunRecord, TaskScore
from mergebench.report.store import config_hash, open_store
from mergebench.util.errors import MergeBenchError

pytest_plugins = ["conftest_postgres"]  # the postgres_server and postgres_url fixtures


def bench_hash(config, label=None) -> str:
    """The hash the benchmark stores a run under (its volatile keys left out)."""
    return config_hash(config, label, volatile=VOLATILE_KEYS)


def make_record(label: str = "ties", scaling: float = 0.3, **kw) -> RunRecord:
    defaults = dict(
        method=label,
        label=label,
        family="tiny",
        taskset="two",
        config={"method": {"name": label, "scaling": scaling}, "model": {"name": "tiny"}},
        scores=[
            TaskScore("a", "accuracy", 0.75),
            TaskScore("a", "f1", 0.5),
            TaskScore("b", "accuracy", float("nan")),
        ],
        merge_seconds=1.5,
        peak_rss_bytes=2**40,
        artifact_bytes=456,
        extra={"note": "x"},
    )
    defaults.update(kw)
    return RunRecord(**defaults)


def test_roundtrip_replace_and_filters(postgres_url) -> None:
    store = open_store(postgres_url)
    assert store.backend == "postgresql" and store.runs() == []
    rec = make_record()
    assert not store.has_run(store.record_hash(rec))
    first = store.add_run(rec, sweep_id="sweep-1")
    assert store.has_run(store.record_hash(rec))
    (run,) = store.runs()
    assert run["run_id"] == first and run["sweep_id"] == "sweep-1"
    assert run["config"]["method"] == {"name": "ties", "scaling": 0.3}
    assert run["extra"] == {"note": "x"} and run["peak_rss_bytes"] == 2**40
    assert [(s["task"], s["metric"], s["value"]) for s in store.scores()] == [
        ("a", "accuracy", 0.75),
        ("a", "f1", 0.5),
        ("b", "accuracy", None),
    ]
    back = store.get_record(first)
    assert back.label == "ties" and back.scores[:2] == rec.scores[:2]

    # the same hash replaces the stored run, with a new (later) run id, as in SQLite
    second = store.add_run(make_record(scores=[TaskScore("a", "accuracy", 0.9)]))
    assert second > first
    assert [r["run_id"] for r in store.runs()] == [second]
    assert [s["value"] for s in store.scores()] == [0.9]

    store.add_run(make_record("emr", family="other"))
    store.add_run(make_record("ta", scores=[TaskScore("a", "accuracy", 0.6, "validation")]))
    assert {r["label"] for r in store.runs(family="tiny")} == {"ties", "ta"}
    assert [s["value"] for s in store.scores(split="validation")] == [0.6]
    assert store.settings() == [("other", "two"), ("tiny", "two")]
    with pytest.raises(MergeBenchError, match="no run with id"):
        store.get_record(10**9)


def test_duplicate_score_is_rejected_and_nothing_written(postgres_url) -> None:
    store = open_store(postgres_url)
    bad = make_record(scores=[TaskScore("a", "accuracy", 0.1), TaskScore("a", "accuracy", 0.2)])
    with pytest.raises(MergeBenchError, match="given twice"):
        store.add_run(bad)
    assert store.runs() == []


def test_reading_never_creates_tables(postgres_url) -> None:
    import psycopg

    with pytest.raises(MergeBenchError, match="not a mergebench results database"):
        open_store(postgres_url, readonly=True)
    with psycopg.connect(postgres_url) as con:
        tables = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()[0]
    assert tables == 0

    open_store(postgres_url).add_run(make_record())
    reader = open_store(postgres_url, readonly=True)
    assert len(reader.runs()) == 1
    with pytest.raises(MergeBenchError, match="read-only"):
        reader.add_run(make_record("emr"))


def test_another_applications_tables_are_refused(postgres_url) -> None:
    import psycopg

    with psycopg.connect(postgres_url) as con:
        con.execute("CREATE TABLE runs (id INT)")
    for readonly in (True, False):
        with pytest.raises(MergeBenchError, match="not a mergebench results database"):
            open_store(postgres_url, readonly=readonly)


def test_unreachable_server_is_one_clear_line() -> None:
    url = "postgresql://me:secret@127.0.0.1:1/nothing"
    with pytest.raises(MergeBenchError, match="cannot connect") as err:
        open_store(url, timeout_s=2)
    assert "secret" not in str(err.value) and "\n" not in str(err.value)


# -- concurrent sweep writers, both backends ----------------------------------------------
WORKERS, RUNS_EACH, STRIDE = 4, 25, 12  # worker w writes configs w*12 .. w*12+24: overlaps

_WRITER = textwrap.dedent(
    """
    import importlib.util, sys, types

    # The store needs neither torch nor the methods: skip the package's __init__ (it imports
    # them, seconds per process), so that the test times the writers, not the imports.
    spec = importlib.util.find_spec("mergebench")
    pkg = types.ModuleType("mergebench")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["mergebench"] = pkg

    from mergebench.report.records import RunRecord, TaskScore
    from mergebench.report.store import open_store

    url, worker = sys.argv[1], int(sys.argv[2])
    runs, stride = int(sys.argv[3]), int(sys.argv[4])
    store = open_store(url)
    ids = [worker * stride + i for i in range(runs)]
    for j in ids if worker % 2 == 0 else reversed(ids):  # meet the neighbours head on
        store.add_run(
            RunRecord(
                method="ties", label="ties", family="tiny", taskset="two",
                config={"method": {"name": "ties", "j": j}},
                scores=[TaskScore(f"t{k}", "accuracy", j + k / 10) for k in range(4)],
                extra={"worker": worker},
            ),
            sweep_id=f"w{worker}",
        )
    """
)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "results.sqlite")  # pytest's tmp folder: a local disk here
    return request.getfixturevalue("postgres_url")


def test_concurrent_sweep_writers_lose_nothing(store_url) -> None:
    open_store(store_url)  # as the first job of a sweep would
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, store_url, str(w), str(RUNS_EACH), str(STRIDE)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WORKERS)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * WORKERS, errors
    elapsed = time.perf_counter() - start

    store = open_store(store_url, readonly=True)
    runs = store.runs()
    expected = {w * STRIDE + i for w in range(WORKERS) for i in range(RUNS_EACH)}
    stored = [r["config"]["method"]["j"] for r in runs]
    assert len(stored) == len(set(stored)), "duplicate runs"
    assert set(stored) == expected, "lost runs"
    assert len({r["config_hash"] for r in runs}) == len(runs)
    # scores intact: every run has exactly its own four scores, in order
    by_run: dict[int, list[tuple[str, float]]] = {}
    for s in store.scores():
        by_run.setdefault(s["run_id"], []).append((s["task"], s["value"]))
    for r in runs:
        j = r["config"]["method"]["j"]
        assert by_run[r["run_id"]] == [(f"t{k}", pytest.approx(j + k / 10)) for k in range(4)]
    assert len(store.scores()) == 4 * len(expected)
    print(f"{store.backend}: {WORKERS}x{RUNS_EACH} runs in {elapsed:.1f} s")


# -- a sweep across nodes: the SLURM launcher with the server-backed store -----------------
@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="optional extra: pip install -e '.[slurm]'",
)
def test_slurm_sweep_config_carries_store_url_into_the_job(postgres_url) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from mergebench.bench.job import _open_store
    from mergebench.util.config import conf_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base=None):
            cfg = compose(
                "config",
                overrides=["hydra/launcher=slurm", f"store.url={postgres_url}"],
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    with open_dict(cfg):  # a job gets the config without its `hydra` node
        del cfg["hydra"]
    job_cfg = OmegaConf.to_container(cfg, resolve=True)  # what run() turns it into
    assert job_cfg["store"]["url"] == postgres_url
    assert job_cfg["store"]["allow_network_fs"] is False
    store = _open_store(job_cfg)
    assert store.backend == "postgresql" and store.runs() == []
    # the store settings never change a run's identity
    other = job_cfg | {"store": {"path": "x.sqlite", "url": None, "allow_network_fs": True}}
    assert bench_hash(job_cfg) == bench_hash(other)
