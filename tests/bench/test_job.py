"""The `mergebench` job's resume rules: `force=true` runs a stored config again, a rebuilt zoo
is not skipped as stored, and the device is not part of the run hash."""

from __future__ import annotations

from fake_job import FakeJob, bench_cfg, stored_runs

from mergebench.bench import job
from mergebench.bench.identity import VOLATILE_KEYS
from mergebench.report.store import SQLiteStore, config_hash


def bench_hash(config, label=None) -> str:
    """The hash the benchmark stores a run under (its volatile keys left out)."""
    return config_hash(config, label, volatile=VOLATILE_KEYS)


def test_force_true_runs_a_stored_config_again_and_replaces_it(tmp_path, monkeypatch):
    fake = FakeJob(monkeypatch)
    assert job.run(bench_cfg(tmp_path))["label"] == "task_arithmetic"
    assert job.run(bench_cfg(tmp_path)) == {"label": "task_arithmetic", "skipped": True}
    assert len(fake.merges) == 1
    summary = job.run(bench_cfg(tmp_path, "force=true"))
    assert summary.get("skipped") is None
    assert len(fake.merges) == 2
    runs = stored_runs(tmp_path)
    assert len(runs) == 1  # replaced, not added
    scores = SQLiteStore(tmp_path / "results.sqlite").scores()
    assert [round(s["value"], 6) for s in scores] == [0.7]  # the forced run's score


def test_a_rebuilt_zoo_is_not_skipped_as_stored(tmp_path, monkeypatch):
    fake = FakeJob(monkeypatch)
    job.run(bench_cfg(tmp_path))
    fake.signature = "zoo-2"  # the zoo was rebuilt: other checkpoints, other data
    summary = job.run(bench_cfg(tmp_path))
    assert summary.get("skipped") is None
    assert len(fake.merges) == 2
    runs = stored_runs(tmp_path)
    assert [r["config"]["zoo_signature"] for r in runs] == ["zoo-1", "zoo-2"]
    assert len({r["config_hash"] for r in runs}) == 2


def test_device_does_not_change_the_run_hash(tmp_path, monkeypatch):
    fake = FakeJob(monkeypatch)
    job.run(bench_cfg(tmp_path, "device=cpu"))
    assert fake.merges[0]["device"] == "cpu"
    # The same run on another device computes the same thing: it is skipped as stored.
    assert job.run(bench_cfg(tmp_path, "device=cuda:1"))["skipped"] is True
    assert len(fake.merges) == 1
    base = {"method": {"name": "ties", "k": 0.2}, "zoo_signature": "z"}
    assert bench_hash({**base, "device": "cpu"}) == bench_hash({**base, "device": "cuda"})
    assert bench_hash(base) == bench_hash({**base, "device": "cuda"})


def test_the_hash_sees_the_zoo_signature_and_the_method():
    base = {"method": {"name": "ties", "k": 0.2}, "zoo_signature": "z"}
    assert bench_hash(base) != bench_hash({**base, "zoo_signature": "z2"})
    assert bench_hash(base) != bench_hash({**base, "method": {"name": "ties", "k": 0.3}})
    assert bench_hash(base) != bench_hash({**base, "force": True, "zoo_signature": "z2"})
    assert bench_hash(base) == bench_hash({**base, "force": True})


def test_a_finished_job_says_where_its_row_went(tmp_path, monkeypatch, capsys):
    # Issue 22.7: the job printed its scores but not where the board would find them.
    FakeJob(monkeypatch)
    job.run(bench_cfg(tmp_path))
    out = capsys.readouterr().out
    assert f"task_arithmetic: stored in {tmp_path / 'results.sqlite'}" in out
    job.run(bench_cfg(tmp_path, "store.path=null"))
    assert (
        "task_arithmetic: not stored (store.path and store.url are null)" in capsys.readouterr().out
    )


def test_board_legend_says_throughput_depends_on_load():
    from mergebench.report.boards import Board
    from mergebench.report.render import to_markdown

    board = Board(family="f", taskset="t", tasks=["a"], metrics={"a": "accuracy"}, rows=[])
    assert "eval ex/s depends on the machine's load when the row ran" in to_markdown([board])
