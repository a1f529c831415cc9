"""Fig. 5 weight statistics and storage accounting on small hand-made models."""

from __future__ import annotations

import math

import pytest
import torch

from mergebench.api import merge_pool
from mergebench.bench.analysis import (
    checkpoint_bytes,
    storage_report,
    task_sign_conflicts,
    weight_stats,
)
from mergebench.engine.pool import ModelPool
from mergebench.results import SingleModelResult


def vector_pool(vectors: dict[str, list[float]]) -> ModelPool:
    """Pretrained zeros, W_t = tau_t on one key `w`."""
    n = len(next(iter(vectors.values())))
    return ModelPool.from_checkpoints(
        {"w": torch.zeros(n)}, {t: {"w": torch.tensor(v)} for t, v in vectors.items()}
    )


def fixed_result(pool: ModelPool, merged: list[float]) -> SingleModelResult:
    return SingleModelResult(
        method="hand", params={}, tasks=pool.tasks, shared={"w": torch.tensor(merged)}
    )


def test_weight_stats_by_hand() -> None:
    pool = vector_pool({"a": [1.0, -2.0, 0.0, 3.0], "b": [1.0, 1.0, 1.0, -1.0]})
    result = fixed_result(pool, [2.0, 1.0, 0.0, 0.0])
    stats = {s.task: s for s in weight_stats(result, pool)}
    a, b = stats["a"], stats["b"]
    # task a: entry 1 has opposite signs (1 vs -2); entries at zero are not conflicts
    assert a.sign_conflicts == pytest.approx(1 / 4)
    assert a.l2_distance == pytest.approx(math.sqrt(1 + 9 + 0 + 9))
    assert a.cosine == pytest.approx((2 - 2) / (math.sqrt(5) * math.sqrt(14)))
    assert b.sign_conflicts == 0.0
    assert b.cosine == pytest.approx(3 / (math.sqrt(5) * 2))
    assert a.numel == 4 and a.method == "hand"


def test_emr_removes_sign_conflicts_that_task_arithmetic_has(tiny_models) -> None:
    pre, finetuned = tiny_models
    pool = ModelPool.from_checkpoints(pre, finetuned, exclude=[r"classifier\..*"])
    ta = weight_stats(merge_pool("task_arithmetic", pool, progress=False), pool)
    emr = weight_stats(merge_pool("emr", pool, progress=False), pool)
    # EMR's masks keep only entries whose sign agrees with the task: no conflicts remain
    assert all(s.sign_conflicts == 0.0 for s in emr)
    assert all(s.sign_conflicts > 0.05 for s in ta)
    # and the per-task models sit closer to the fine-tuned ones
    for t, e in zip(ta, emr, strict=True):
        assert e.l2_distance < t.l2_distance
        assert e.cosine > t.cosine
    # classifier heads are excluded, integer buffers are not merged: 6*5 + 6 + 4*6 entries
    assert emr[0].numel == 30 + 6 + 24


def test_individual_model_has_perfect_stats() -> None:
    pool = vector_pool({"a": [1.0, -2.0, 0.5]})
    (s,) = weight_stats(fixed_result(pool, [1.0, -2.0, 0.5]), pool)
    assert s.sign_conflicts == 0.0 and s.l2_distance == 0.0 and s.cosine == pytest.approx(1.0)


def test_task_sign_conflicts() -> None:
    pool = vector_pool({"a": [1.0, -1.0, 1.0, 0.0], "b": [1.0, 1.0, -1.0, 2.0], "c": [-1.0] * 4})
    conflicts = task_sign_conflicts(pool)
    assert conflicts[("a", "b")] == pytest.approx(2 / 4)
    assert conflicts[("a", "c")] == pytest.approx(2 / 4)
    assert conflicts[("b", "c")] == pytest.approx(3 / 4)


def test_storage_single_vs_emr(tiny_models) -> None:
    pre, finetuned = tiny_models
    pool = ModelPool.from_checkpoints(pre, finetuned, exclude=[r"classifier\..*"])
    separate = sum(checkpoint_bytes(ft) for ft in pool.finetuned.values())
    # three models: float weights (30+6+24+12) * 4 bytes + int64 position_ids 7 * 8, heads differ
    heads = sum((2 + i) * 4 * 4 for i in range(3))
    assert separate == 3 * ((30 + 6 + 24) * 4 + 7 * 8) + heads

    ta = storage_report(merge_pool("task_arithmetic", pool, progress=False), pool)
    assert ta.serving_bytes == (30 + 6 + 24) * 4 + 7 * 8 + 3 * 4 * 4 + heads
    assert ta.separate_bytes == separate and 0 < ta.ratio < 1

    emr = storage_report(merge_pool("emr", pool, progress=False), pool)
    # pretrained + unified (float32) + one packed bit per entry per task, rescalers, buffers
    packed = 3 * (math.ceil(30 / 8) + math.ceil(6 / 8) + math.ceil(24 / 8))
    expected = 2 * 60 * 4 + packed + 3 * 4 + 7 * 8 + 3 * 4 * 4 + heads
    assert emr.serving_bytes == expected
    assert ta.serving_bytes < emr.serving_bytes < separate


def test_stats_accept_an_explicit_key_list() -> None:
    pool = ModelPool.from_checkpoints(
        {"w": torch.zeros(2), "v": torch.zeros(2)},
        {"a": {"w": torch.tensor([1.0, 1.0]), "v": torch.tensor([5.0, 5.0])}},
    )
    result = SingleModelResult(
        method="x",
        params={},
        tasks=["a"],
        shared={"w": torch.tensor([-1.0, 1.0]), "v": torch.zeros(2)},
    )
    (only_w,) = weight_stats(result, pool, keys=["w"])
    assert only_w.numel == 2 and only_w.sign_conflicts == pytest.approx(0.5)
