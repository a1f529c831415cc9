"""Tests that catch the bugs an audit planted one at a time (7 of 20 got through before).

Each test names the planted bug it catches. RegMean's default `alpha` (conf vs methods.md) is
caught by tests/test_method_defaults.py, which pins every method default to the contract.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from data_toys import ToyFamily, mlp_pool
from hydra import compose, initialize_config_dir

import mergebench
import mergebench.methods.fisher as fisher_module
from mergebench.api import merge_pool
from mergebench.bench import job
from mergebench.bench.identity import VOLATILE_KEYS
from mergebench.evaluation import Evaluation
from mergebench.methods.data_utils import InputsOnly
from mergebench.methods.ties import keep_count
from mergebench.report.records import TaskScore
from mergebench.report.store import SQLiteStore, config_hash
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError


def bench_hash(config, label=None) -> str:
    """The hash the benchmark stores a run under (its volatile keys left out)."""
    return config_hash(config, label, volatile=VOLATILE_KEYS)


# --- TIES keep count: floor(k*n + 0.5), not banker's rounding ----------------------------------
@pytest.mark.parametrize(
    ("k", "n", "keep"),
    [
        (0.25, 10, 3),  # 2.5: banker's rounding gives 2
        (0.125, 20, 3),  # 2.5
        (0.25, 18, 5),  # 4.5: banker's rounding gives 4
        (0.5, 9, 5),  # 4.5
        (0.125, 4, 1),  # 0.5 -> 1 (banker's gives 0, then max(1, .) = 1)
        (0.375, 4, 2),  # 1.5 -> 2 either way
        (0.5, 13, 7),  # 6.5: banker's rounding gives 6
    ],
)
def test_keep_count_rounds_even_halves_up(k, n, keep):
    assert keep_count(k, n) == keep


def test_ties_keeps_three_of_ten_at_k_0_25():
    # n = 10, k = 0.25: keep = floor(2.5 + 0.5) = 3 of the distinct magnitudes 10..1.
    tau = [10.0, -9.0, 8.0, -7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    pre, finetuned = {"w": torch.zeros(10)}, {"a": {"w": torch.tensor(tau)}}
    for scope in ("tensor", "global"):
        out = mergebench.merge(
            "ties", pre, finetuned, k=0.25, scaling=1.0, topk_scope=scope, progress=False
        ).state_dict()["w"]
        expected = torch.tensor([10.0, -9.0, 8.0] + [0.0] * 7)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


# --- the label guard refuses every label-like key, in any case --------------------------------
LABEL_LIKE = [
    "label",
    "labels",
    "label_ids",
    "target",
    "targets",
    "y",
    "Label",
    "LABELS",
    "Label_IDs",
    "Target",
    "TARGETS",
    "Y",
]


def guarded(extra_key: str) -> InputsOnly:
    x = torch.randn(4, 3)
    family = ToyFamily({"a": {"train": x}}, lambda task: torch.nn.Linear(3, 2))
    family.extra = {"a": {"train": {extra_key: torch.zeros(4, dtype=torch.long)}}}
    return InputsOnly(family, "regmean", "toy")


@pytest.mark.parametrize("key", LABEL_LIKE)
def test_label_guard_refuses_every_label_key(key):
    batches = guarded(key).batches("a", "train", None, 2, torch.device("cpu"))
    with pytest.raises(MergeBenchError, match=rf"(?i)key '{key}' .*never receive labels"):
        next(batches)


@pytest.mark.parametrize("key", ["attention_mask", "input_ids", "pixel_values", "yy", "labeled"])
def test_label_guard_lets_inputs_through(key):
    batches = list(guarded(key).batches("a", "train", None, 2, torch.device("cpu")))
    assert [sorted(b) for b in batches] == [sorted(["x", key])] * 2


# --- the mergebench job: force=true, zoo signature and device in the resume hash -------------
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


# --- Fisher's `normalize` ------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_normalize_equalises_tasks_of_different_scale(monkeypatch, normalize):
    """Task a's Fisher is 1 everywhere, task b's 3: normalised, both weigh the same (the
    weight average); unnormalised, b weighs three times as much as a."""
    pool, _ = mlp_pool(tasks=("a", "b"), classes=(2, 3))
    scale = {"a": 1.0, "b": 3.0}

    def flat_fisher(data, model, keys, task, *args, **kwargs):
        params = dict(model.named_parameters())
        return {k: torch.full_like(params[k], scale[task]).detach() for k in keys}, 8

    monkeypatch.setattr(fisher_module, "diagonal_fisher", flat_fisher)
    merged = merge_pool("fisher", pool, progress=False, normalize=normalize).state_dict("a")
    wa, wb = (0.5, 0.5) if normalize else (0.25, 0.75)
    for key in ("layer.weight", "layer.bias", "out.weight", "norm.weight"):
        a, b = pool.finetuned["a"].state_dict()[key], pool.finetuned["b"].state_dict()[key]
        torch.testing.assert_close(merged[key], wa * a + wb * b, rtol=1e-6, atol=1e-6)
