"""Task metrics, all from torchmetrics, named as they appear in results (`accuracy` ...)."""

from __future__ import annotations

from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)

from mergebench.errors import MergeBenchError

METRICS = ("accuracy", "macro_f1", "mcc")


def build_metric(name: str, num_classes: int) -> Metric:
    """A fresh torchmetrics object that takes `(logits [B, C], labels [B])`."""
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=num_classes, average="micro")
    if name == "macro_f1":
        return MulticlassF1Score(num_classes=num_classes, average="macro")
    if name == "mcc":
        return MulticlassMatthewsCorrCoef(num_classes=num_classes)
    raise MergeBenchError(f"metric: unknown metric {name!r} (known: {', '.join(METRICS)})")
