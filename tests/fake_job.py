"""`job.run` without a zoo, for the tests of the `mergebench` job (its resume rules, options
and labels): a fixed source signature, merges and evaluations counted, a store in tmp_path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from mergebench.bench import job
from mergebench.evaluation import Evaluation
from mergebench.report.records import TaskScore
from mergebench.report.store import SQLiteStore
from mergebench.util.config import conf_dir


class FakeJob:
    """`job.run` without a zoo: a fixed source signature, merges and evaluations counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.signature = "zoo-1"
        self.merges: list[dict] = []
        source = SimpleNamespace(
            pool=lambda: "pool", cache_dir=lambda: "/nonexistent/zoo", data=None
        )
        monkeypatch.setattr(
            job,
            "_context",
            lambda cfg, progress: job.Context(source, self.signature, cache=None),
        )
        monkeypatch.setattr(job, "merge_pool", self._merge)
        monkeypatch.setattr(job, "_artifact_size", lambda result, measure: 0)
        monkeypatch.setattr(job, "evaluate_timed", self._evaluate)
        monkeypatch.setattr(job, "log_with_leaderboard", lambda *args, **kwargs: None)

    def _merge(self, name, pool, device, progress, **params):
        self.merges.append({"name": name, "device": device, **params})
        return object()

    def _evaluate(self, result, data, **kwargs):
        value = 0.5 + 0.1 * len(self.merges)  # differs per merge: replaced rows are visible
        return Evaluation(scores=[TaskScore("a", "accuracy", value)], seconds=0.1, examples=1)


def bench_cfg(tmp_path, *overrides: str):
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose(
            "config",
            overrides=[
                "method=task_arithmetic",
                "references=false",
                "protocol.select=false",  # no validation search: one merge per run
                "progress=false",
                f"store.path={tmp_path / 'results.sqlite'}",
                *overrides,
            ],
        )


def stored_runs(tmp_path) -> list[dict]:
    return SQLiteStore(tmp_path / "results.sqlite").runs()
