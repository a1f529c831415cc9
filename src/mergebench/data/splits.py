"""Seeded, stratified train / validation / test splits and a fingerprint of what they hold."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import numpy as np

from mergebench.engine.pool import SPLITS


@dataclass(frozen=True)
class RawData:
    """All examples of one task: inputs (texts or uint8 images) and int64 labels."""

    inputs: list[str] | np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SplitSizes:
    """Wanted example counts; small data sets get proportionally smaller splits."""

    train: int
    validation: int
    test: int


@dataclass(frozen=True)
class Split:
    """One split of one task: inputs and labels, kept together only here and in the
    evaluator's accessor (families hand out inputs only)."""

    inputs: list[str] | np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TaskSplits:
    task: str
    classes: tuple[str, ...]
    train: Split
    validation: Split
    test: Split
    fingerprint: str

    def split(self, name: str) -> Split:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def _sizes_for(n: int, wanted: SplitSizes) -> tuple[int, int, int]:
    """At most 30% of a small set for test and 10% for validation, the rest for training."""
    test = min(wanted.test, int(0.3 * n))
    validation = min(wanted.validation, int(0.1 * n))
    train = min(wanted.train, n - test - validation)
    return train, validation, test


def _take(indices: np.ndarray, labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k indices drawn without replacement, stratified by label (largest-remainder quota),
    in a random order. Stratifying keeps tiny splits from missing whole classes by chance."""
    if k >= len(indices):
        return rng.permutation(indices)
    classes, counts = np.unique(labels[indices], return_counts=True)
    quota = counts * k / len(indices)
    take = np.floor(quota).astype(int)
    remainder_order = np.argsort(-(quota - take), kind="stable")
    take[remainder_order[: k - take.sum()]] += 1
    chosen = [
        rng.choice(indices[labels[indices] == c], size=t, replace=False)
        for c, t in zip(classes, take, strict=True)
    ]
    return rng.permutation(np.concatenate(chosen))


def _subset(data: RawData, idx: np.ndarray) -> Split:
    inputs = [data.inputs[i] for i in idx] if isinstance(data.inputs, list) else data.inputs[idx]
    return Split(inputs=inputs, labels=data.labels[idx])


def fingerprint(task: str, splits: dict[str, Split]) -> str:
    """sha256 over every input and label of every split: two zoos trained on the same
    fingerprint saw exactly the same data."""
    h = hashlib.sha256(task.encode())
    for name in SPLITS:
        split = splits[name]
        h.update(name.encode())
        if isinstance(split.inputs, list):
            for text in split.inputs:
                h.update(text.encode("utf-8") + b"\0")
        else:
            h.update(np.ascontiguousarray(split.inputs).tobytes())
        h.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def make_splits(task: str, data: RawData, sizes: SplitSizes, seed: int) -> TaskSplits:
    """Disjoint stratified splits drawn with a generator seeded by `seed` and the task name
    (so that tasks of one set do not share a permutation)."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    n_train, n_val, n_test = _sizes_for(len(data), sizes)
    remaining = np.arange(len(data))
    parts = {}
    for name, k in (("test", n_test), ("validation", n_val), ("train", n_train)):
        idx = _take(remaining, data.labels, k, rng)
        remaining = np.setdiff1d(remaining, idx)
        parts[name] = _subset(data, idx)
    return TaskSplits(
        task=task,
        classes=data.classes,
        train=parts["train"],
        validation=parts["validation"],
        test=parts["test"],
        fingerprint=fingerprint(task, parts),
    )
