"""Task metrics, all from torchmetrics, named as they appear in results (`accuracy` ...),
and `ScoredTask`, what a task scored by its own evaluation reports (BEiT-3)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from mergebench.util.errors import MergeBenchError

METRICS = ("accuracy", "macro_f1", "mcc")
# Metrics of the paper settings: torchmetrics' classification metrics (tasks/metrics.py) and
# the STS-B score, the mean of Pearson's and Spearman's correlation.
REGRESSION_METRIC = "pearson_spearman"
HF_METRICS = ("accuracy", "macro_f1", "mcc", REGRESSION_METRIC)


def build_metric(name: str, num_classes: int) -> Metric:
    """A fresh torchmetrics object that takes `(logits [B, C], labels [B])`."""
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=num_classes, average="micro")
    if name == "macro_f1":
        return MulticlassF1Score(num_classes=num_classes, average="macro")
    if name == "mcc":
        return MulticlassMatthewsCorrCoef(num_classes=num_classes)
    raise MergeBenchError(f"metric: unknown metric {name!r} (known: {', '.join(METRICS)})")


class PearsonSpearman(Metric):
    """STS-B's score: the mean of Pearson's and Spearman's correlation (GLUE's convention)."""

    def __init__(self) -> None:
        super().__init__()
        self.pearson = PearsonCorrCoef()
        with warnings.catch_warnings():  # "keeps every prediction": 1,500 for STS-B
            warnings.simplefilter("ignore", UserWarning)
            self.spearman = SpearmanCorrCoef()

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds = preds.reshape(-1).float()  # [B, 1] regression logits
        target = target.reshape(-1).float()
        self.pearson.update(preds, target)
        self.spearman.update(preds, target)

    def compute(self) -> torch.Tensor:
        return (self.pearson.compute() + self.spearman.compute()) / 2

    def reset(self) -> None:
        super().reset()
        self.pearson.reset()
        self.spearman.reset()


def build_task_metric(name: str, num_classes: int) -> Metric:
    if name == REGRESSION_METRIC:
        return PearsonSpearman()
    return build_metric(name, num_classes)


@dataclass(frozen=True)
class ScoredTask:
    """A task scored by its own evaluation (not a torchmetrics metric over logits): its
    metrics, primary first, and what the bootstrap resamples: per example a prediction and
    label under `per_example` (`accuracy`), or the example's own score as `pred`
    (`mean_score`: VQA accuracy, CIDEr, retrieval hits; `label` unused)."""

    values: dict[str, float]
    per_example: str
    pred: np.ndarray
    label: np.ndarray
    classes: int = 0
