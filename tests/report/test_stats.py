"""The leaderboard's bootstrap: metrics recomputed from predictions agree with the
evaluator's torchmetrics; intervals are seeded, paired, and resolve what they should."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergebench.data.metrics import build_metric, build_task_metric
from mergebench.report.stats import (
    Outcome,
    bootstrap_rows,
    metric_value,
    ranks_with_ties,
    resample_indices,
    tied,
)


@pytest.mark.parametrize("name", ["accuracy", "macro_f1", "mcc"])
@pytest.mark.parametrize("classes", [2, 5])
def test_classification_metrics_match_torchmetrics(name, classes):
    rng = np.random.default_rng(classes)
    label = rng.integers(0, classes, 300)
    # Predictions that are right 60% of the time and never predict the last class.
    pred = np.where(rng.random(300) < 0.6, label, rng.integers(0, max(1, classes - 1), 300))
    logits = torch.nn.functional.one_hot(torch.as_tensor(pred), classes).float()
    metric = build_metric(name, classes)
    metric.update(logits, torch.as_tensor(label))
    assert metric_value(name, pred, label, classes) == pytest.approx(
        float(metric.compute()), abs=1e-6
    )


def test_pearson_spearman_matches_torchmetrics_with_ties():
    rng = np.random.default_rng(0)
    label = np.round(rng.random(200) * 5, 1)  # many tied labels
    pred = label + rng.normal(0, 1, 200).astype(np.float32)
    metric = build_task_metric("pearson_spearman", 1)
    metric.update(torch.as_tensor(pred)[:, None], torch.as_tensor(label))
    assert metric_value("pearson_spearman", pred, label, 1) == pytest.approx(
        float(metric.compute()), abs=1e-5
    )


def test_hand_computed_mcc_and_f1():
    # Binary: TP=2, FN=1, FP=1, TN=2 -> MCC = (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3.
    label = [1, 1, 1, 0, 0, 0]
    pred = [1, 1, 0, 1, 0, 0]
    assert metric_value("mcc", pred, label, 2) == pytest.approx(1 / 3)
    # F1 of both classes is 2/3, so macro F1 = 2/3; accuracy 4/6.
    assert metric_value("macro_f1", pred, label, 2) == pytest.approx(2 / 3)
    assert metric_value("accuracy", pred, label, 2) == pytest.approx(4 / 6)


def _outcome(pred, label, classes=2, metric="accuracy"):
    return Outcome(metric, np.asarray(pred), np.asarray(label), classes)


def test_resamples_are_seeded_and_shared_by_rows():
    a = resample_indices("t", 50, 10, seed=3)
    assert np.array_equal(a, resample_indices("t", 50, 10, seed=3))
    assert not np.array_equal(a, resample_indices("t", 50, 10, seed=4))
    assert not np.array_equal(a, resample_indices("u", 50, 10, seed=3))  # tasks differ


def test_intervals_contain_the_point_estimate_and_resolve_clear_differences():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 2, 400)
    good = np.where(rng.random(400) < 0.9, label, 1 - label)
    bad = np.where(rng.random(400) < 0.6, label, 1 - label)
    almost_good = good.copy()
    almost_good[:2] = 1 - almost_good[:2]  # two examples differ from `good`
    rows = {
        "good": {"t": _outcome(good, label)},
        "almost": {"t": _outcome(almost_good, label)},
        "bad": {"t": _outcome(bad, label)},
    }
    stats = bootstrap_rows(rows, ["t"], resamples=1000, seed=0)
    for name, row in rows.items():
        point = metric_value("accuracy", row["t"].pred, label, 2)
        low, high = stats[name].average_ci
        assert low <= point <= high
        assert stats[name].scores_ci["t"] == stats[name].average_ci  # one task
    assert tied(stats["almost"].draws, stats["good"].draws)
    assert not tied(stats["bad"].draws, stats["good"].draws)
    ranks = ranks_with_ties({k: v.draws for k, v in stats.items()}, ["good", "almost", "bad"])
    assert ranks == {"good": "1=", "almost": "1=", "bad": "3"}


def test_rows_scored_on_different_test_sets_are_an_error():
    rows = {"a": {"t": _outcome([0, 1], [0, 1])}, "b": {"t": _outcome([0, 1, 1], [0, 1, 1])}}
    with pytest.raises(ValueError, match="different test sets"):
        bootstrap_rows(rows, ["t"], resamples=10)
