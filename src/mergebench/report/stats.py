"""Uncertainty of leaderboard numbers: a paired bootstrap over test examples.

Every run stores, per task, its prediction for each test example (in the data set's order)
and the label. A resample draws test examples with replacement, per task, with a generator
seeded by `seed` and the task name, so every row of a board is scored on the same resampled
examples: comparisons between rows are paired. From `resamples` draws we report
- a 95% percentile interval of each task's score and of the average over tasks;
- whether a row is tied with the best row: the 95% interval of (row - best) on the paired
  resamples contains 0;
- ranks that show ties: a row's rank is 1 + the number of rows that beat it on a clear
  margin (their paired difference interval lies above 0); rows sharing a rank print `2=`.

Metrics are recomputed from predictions with the same definitions as the evaluator's
torchmetrics (accuracy, macro F1, Matthews correlation, mean of Pearson and Spearman);
`tests/report/test_stats.py` holds them to torchmetrics on random data. Tasks scored by
their own evaluation (`mean`: BEiT-3's VQA, captioning, retrieval) store each
example's score as its prediction.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95


# ---------------------------------------------------------------------------- metrics, batched
def _confusions(pred: np.ndarray, label: np.ndarray, classes: int) -> np.ndarray:
    """Confusion matrices `[B, classes, classes]` (rows: label, columns: prediction) of the
    `B` resamples `pred [B, n]`, `label [B, n]`."""
    b = pred.shape[0]
    flat = (np.arange(b)[:, None] * classes * classes + label * classes + pred).ravel()
    counts = np.bincount(flat, minlength=b * classes * classes)
    return counts.reshape(b, classes, classes).astype(np.float64)


def accuracy(pred: np.ndarray, label: np.ndarray, classes: int) -> np.ndarray:
    return (pred == label).mean(axis=-1)


def macro_f1(pred: np.ndarray, label: np.ndarray, classes: int) -> np.ndarray:
    """Mean over classes of F1 (a class with no true, no predicted example scores 0, as in
    torchmetrics' `MulticlassF1Score(average="macro")`)."""
    conf = _confusions(pred, label, classes)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    fp = conf.sum(axis=1) - tp
    fn = conf.sum(axis=2) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1.mean(axis=-1)


def mcc(pred: np.ndarray, label: np.ndarray, classes: int) -> np.ndarray:
    """Multi-class Matthews correlation (Gorodkin's R_K), 0 where it is undefined."""
    conf = _confusions(pred, label, classes)
    n = conf.sum(axis=(1, 2))
    correct = np.trace(conf, axis1=1, axis2=2)
    true_k = conf.sum(axis=2)
    pred_k = conf.sum(axis=1)
    cov_xy = correct * n - (true_k * pred_k).sum(axis=1)
    cov_yy = n**2 - (pred_k**2).sum(axis=1)
    cov_xx = n**2 - (true_k**2).sum(axis=1)
    denom = np.sqrt(cov_xx * cov_yy)
    return np.divide(cov_xy, denom, out=np.zeros_like(cov_xy), where=denom > 0)


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    denom = np.sqrt((xc**2).sum(axis=-1) * (yc**2).sum(axis=-1))
    num = (xc * yc).sum(axis=-1)
    return np.divide(num, denom, out=np.zeros_like(num), where=denom > 0)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), as Spearman needs."""
    order = np.argsort(x, axis=-1, kind="stable")
    sorted_x = np.take_along_axis(x, order, axis=-1)
    ranks = np.empty_like(x, dtype=np.float64)
    for row in range(x.shape[0]):
        values, start, counts = np.unique(sorted_x[row], return_index=True, return_counts=True)
        mean_rank = start + (counts - 1) / 2.0
        ranks[row, order[row]] = np.repeat(mean_rank, counts)
    return ranks


def pearson_spearman(pred: np.ndarray, label: np.ndarray, classes: int) -> np.ndarray:
    pred, label = pred.astype(np.float64), label.astype(np.float64)
    return (_pearson(pred, label) + _pearson(_ranks(pred), _ranks(label))) / 2


def mean(pred: np.ndarray, label: np.ndarray, classes: int) -> np.ndarray:
    """The mean of per-example scores stored as `pred`, for tasks scored example by example
    by their own evaluation (lm-eval; BEiT-3's VQA accuracy, CIDEr, retrieval hits);
    `label` is unused."""
    return pred.astype(np.float64).mean(axis=-1)


METRIC_FUNCTIONS = {
    "accuracy": accuracy,
    "mean": mean,
    "macro_f1": macro_f1,
    "mcc": mcc,
    "pearson_spearman": pearson_spearman,
}


def metric_value(name: str, pred: Sequence, label: Sequence, classes: int) -> float:
    """One metric on the whole set (no resampling)."""
    fn = METRIC_FUNCTIONS[name]
    return float(fn(np.asarray(pred)[None], np.asarray(label)[None], classes)[0])


# ---------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class Outcome:
    """One task's test predictions and labels of one run, in the data set's order."""

    metric: str
    pred: np.ndarray
    label: np.ndarray
    classes: int

    def to_json(self) -> dict:
        return {
            "metric": self.metric,
            "classes": self.classes,
            "pred": self.pred.tolist(),
            "label": self.label.tolist(),
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Outcome:
        return cls(
            metric=str(data["metric"]),
            pred=np.asarray(data["pred"]),
            label=np.asarray(data["label"]),
            classes=int(data["classes"]),
        )


def resample_indices(task: str, n: int, resamples: int, seed: int) -> np.ndarray:
    """`[resamples, n]` example indices drawn with replacement; the same for every row."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    return rng.integers(0, n, size=(resamples, n))


@dataclass
class RowStats:
    average_ci: tuple[float, float]
    scores_ci: dict[str, tuple[float, float]]
    draws: np.ndarray  # [resamples] averages over tasks


def _interval(draws: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_rows(
    outcomes: Mapping[str, Mapping[str, Outcome]],
    tasks: Sequence[str],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, RowStats]:
    """Per row (key of `outcomes`): intervals of each task's score and of the average.

    Rows missing a task's outcome get no statistics (they are left out of the result)."""
    complete = {r: o for r, o in outcomes.items() if all(t in o for t in tasks)}
    per_task: dict[str, dict[str, np.ndarray]] = {r: {} for r in complete}
    for task in tasks:
        sizes = {len(o[task].label) for o in complete.values()}
        if len(sizes) > 1:
            raise ValueError(f"task {task!r}: rows were scored on different test sets {sizes}")
        if not sizes:
            continue
        n = sizes.pop()
        if n == 0:
            continue
        idx = resample_indices(task, n, resamples, seed)
        for row, by_task in complete.items():
            outcome = by_task[task]
            fn = METRIC_FUNCTIONS[outcome.metric]
            per_task[row][task] = fn(outcome.pred[idx], outcome.label[idx], outcome.classes)
    stats = {}
    for row, draws in per_task.items():
        if len(draws) != len(tasks):
            continue
        average = np.mean([draws[t] for t in tasks], axis=0)
        stats[row] = RowStats(
            average_ci=_interval(average),
            scores_ci={t: _interval(draws[t]) for t in tasks},
            draws=average,
        )
    return stats


def beats(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether row `a` beats row `b` on a clear margin: the 95% interval of the paired
    difference `a - b` lies above 0."""
    return _interval(a - b)[0] > 0


def tied(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the 95% interval of the paired difference `a - b` contains 0."""
    low, high = _interval(a - b)
    return low <= 0 <= high


def ranks_with_ties(draws: Mapping[str, np.ndarray], order: Sequence[str]) -> dict[str, str]:
    """Rank labels: 1 + the number of rows that beat this one; `k=` when rows share rank k.
    `order` lists the rows by point estimate, best first."""
    rank = {r: 1 + sum(beats(draws[o], draws[r]) for o in order if o != r) for r in order}
    counts: dict[int, int] = {}
    for value in rank.values():
        counts[value] = counts.get(value, 0) + 1
    return {r: f"{k}=" if counts[k] > 1 else str(k) for r, k in rank.items()}
