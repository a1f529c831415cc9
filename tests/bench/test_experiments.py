"""Experiment jobs (Fig. 5 analysis, validation-split selection) on a tiny hand-made pool.

The zoo is replaced by the conftest models so the jobs run in seconds; the zoo itself is
tested by its own suite.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from mergebench.bench import experiments
from mergebench.engine.pool import ModelPool
from mergebench.report.records import TaskScore
from mergebench.report.store import SQLiteStore
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError


@pytest.fixture
def tiny_pool(tiny_models, monkeypatch):
    pre, finetuned = tiny_models
    pool = ModelPool.from_checkpoints(pre, finetuned, exclude=[r"classifier\..*"])
    monkeypatch.setattr(experiments, "zoo_pool", lambda cfg, progress=True: (pool, "data"))
    return pool


def base_cfg(tmp_path, **extra):
    return {
        "model": {"name": "tiny"},
        "taskset": {"name": "abc", "tasks": ["a", "b", "c"]},
        "seed": 0,
        "progress": False,
        "store": {"path": str(tmp_path / "r.sqlite")},
        "logger": {"name": "none"},
        **extra,
    }


def test_fig5_job_writes_tables_and_plots(tiny_pool, tmp_path) -> None:
    preset = OmegaConf.to_container(
        OmegaConf.load(conf_dir() / "experiment" / "fig5_analysis.yaml")
    )
    preset["analysis"]["out_dir"] = str(tmp_path / "analysis")
    stats, storage, out = experiments.run(base_cfg(tmp_path, **preset))
    methods = [m.get("label", m["name"]) for m in preset["analysis"]["methods"]]
    assert {s.method for s in stats} == set(methods)
    assert len(stats) == len(methods) * 3
    emr = [s for s in stats if s.method == "emr"]
    assert all(s.sign_conflicts == 0.0 for s in emr)
    saved = json.loads((out / "tiny_abc_weights.json").read_text())
    assert len(saved["weights"]) == len(stats) and len(saved["storage"]) == len(methods)
    for name in ("tiny_abc_fig5.png", "tiny_abc_storage.png", "tiny_abc_weights.csv"):
        assert (out / name).stat().st_size > 0


class FakeEvaluation(SimpleNamespace):
    pass


def test_hparam_job_stores_val_tuned_rows_and_resumes(tiny_pool, tmp_path, monkeypatch) -> None:
    calls = []

    def fake_evaluate(result, data, split="test", cache=None, **kw):
        # score = closeness of the merged layer to task a's fine-tuned weights
        w = result.state_dict("a")["layer.weight"]
        target = tiny_pool.finetuned["a"].get("layer.weight")
        value = float(1.0 / (1.0 + (w - target).norm()))
        calls.append(split)
        return FakeEvaluation(scores=[TaskScore(t, "accuracy", value, split) for t in "abc"])

    monkeypatch.setattr(experiments, "evaluate_timed", fake_evaluate)
    monkeypatch.setattr(experiments, "ModelCache", lambda data: None)
    cfg = base_cfg(
        tmp_path,
        experiment_job="hparam",
        hparam={
            "methods": ["task_arithmetic", "ties"],
            "grids": {"task_arithmetic": {"scaling": [0.1, 1.0]}, "ties": {"k": [0.2, 1.0]}},
        },
    )
    ids = experiments.run(cfg)
    assert len(ids) == 2
    assert calls.count("validation") == 4 and calls.count("test") == 2
    store = SQLiteStore(tmp_path / "r.sqlite")
    runs = {r["label"]: r for r in store.runs()}
    assert set(runs) == {"task_arithmetic (val-tuned)", "ties (val-tuned)"}
    ta = runs["task_arithmetic (val-tuned)"]["extra"]
    # the pick is the grid point with the best validation average ...
    assert ta["selected"] == max(ta["grid"], key=lambda g: g["val_average"])["params"]
    # ... here 0.1: the three random task vectors are nearly orthogonal, so adding all of
    # them at full scale moves task a's model further from its own weights
    assert ta["selected"] == {"scaling": 0.1}
    assert {s["split"] for s in store.scores(split=None)} == {"test", "validation"}

    calls.clear()
    assert experiments.run(cfg) == []  # stored: skipped
    assert calls == []
    assert len(experiments.run({**cfg, "force": True})) == 2


def test_bad_experiment_config(tmp_path) -> None:
    with pytest.raises(MergeBenchError, match="experiment_job"):
        experiments.run(base_cfg(tmp_path))
    with pytest.raises(MergeBenchError, match="hparam.grids.ties"):
        experiments.run(
            base_cfg(tmp_path, experiment_job="hparam", hparam={"methods": ["ties"], "grids": {}})
        )
