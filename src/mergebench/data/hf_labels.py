"""Labels and class names of the Hugging Face / local data sets, and the data fingerprint,
which depends on the classes string labels map to. Labels are read by the evaluator's
accessor (`families.labeled`) only; families read class names (their heads). The data sets
themselves are opened by `mergebench.data.hf`."""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from mergebench.data.hf import DataSpec, Examples, check_columns, open_split, split_rows
from mergebench.data.splits import SPLITS
from mergebench.util.errors import MergeBenchError


def _label_column(spec: DataSpec, source: str) -> np.ndarray:
    """The whole label column of one source split."""
    dataset = open_split(spec, source)
    check_columns(spec, dataset, source, [spec.label], "label")
    return np.asarray(dataset.select_columns([spec.label])[spec.label])


def _named(spec: DataSpec, source: str) -> tuple[str, ...] | None:
    """The label column's `ClassLabel` names, if it is one."""
    names = getattr(open_split(spec, source).features.get(spec.label), "names", None)
    return tuple(str(n) for n in names) if names else None


def _is_text(labels: np.ndarray) -> bool:
    return labels.dtype.kind in "OUS"


@lru_cache(maxsize=128)
def _train_labels(spec: DataSpec) -> frozenset:
    return frozenset(_label_column(spec, str(spec.source_split("train"))).tolist())


def _check_seen_in_train(spec: DataSpec, split: str, source: str, labels: np.ndarray) -> None:
    """Local data without class names: a label that train lacks has no class a model learnt."""
    if source == spec.source_split("train") or not spec.local or _named(spec, source):
        return
    unseen = sorted(set(labels.tolist()) - _train_labels(spec), key=str)
    if unseen:
        train = spec.source_text(str(spec.source_split("train")))
        raise MergeBenchError(
            f"{spec.where}.{split}: {spec.source_text(source)} has label {unseen[0]!r} that the "
            f"train split ({train}) lacks"
        )


def read_labels(spec: DataSpec, split: str, seed: int, examples: Examples) -> np.ndarray:
    """Labels of one split (the evaluator's side): int64 classes, or float32 scores. String
    labels become the index of their class name (`class_names`)."""
    source, rows = split_rows(spec, split, seed, examples)
    labels = _label_column(spec, source)[rows]
    if spec.regression:
        return labels.astype(np.float32)
    _check_seen_in_train(spec, split, source, labels)
    if _is_text(labels):
        ids = {name: i for i, name in enumerate(class_names(spec))}
        unknown = sorted({str(v) for v in labels} - set(ids))
        if unknown:
            raise MergeBenchError(
                f"{spec.where}.classes: label {unknown[0]!r} of {spec.source_text(source)} is "
                f"not a class name (classes: {', '.join(ids)})"
            )
        return np.asarray([ids[str(v)] for v in labels], dtype=np.int64)
    if len(labels) and labels.min() < 0:
        # GLUE's test splits hide their labels as -1; the paper evaluates on validation.
        raise MergeBenchError(
            f"{spec.where}.splits.{split}: split {source!r} of {spec.label_text} has no labels "
            "(-1); use a labeled split (GLUE: validation)"
        )
    return labels.astype(np.int64)


def label_form(spec: DataSpec) -> str:
    """Where a task's class names come from: `configured` (`classes`), `named` (a ClassLabel
    column), `text` (string labels), `ids` (class ids without names), `score` (regression)."""
    if spec.regression:
        return "score"
    if spec.classes:
        return "configured"
    if _named(spec, str(spec.source_split("test"))) or not spec.local:
        return "named"
    return "text" if all(isinstance(v, str) for v in _train_labels(spec)) else "ids"


def class_names(spec: DataSpec) -> tuple[str, ...]:
    """Class names: the configured ones, else the label column's `ClassLabel` names, else
    (local data) the train split's labels: sorted strings, or `0..max` for class ids.
    A regression task has one output, its score."""
    if spec.regression:
        return ("score",)
    if spec.classes:
        return spec.classes
    names = _named(spec, str(spec.source_split("test")))
    if names:
        return names
    if spec.local:
        seen = _train_labels(spec)
        if all(isinstance(v, str) for v in seen):
            return tuple(sorted(seen))
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seen):
            return tuple(str(i) for i in range(max(seen) + 1))
        raise MergeBenchError(
            f"{spec.where}.label: column {spec.label!r} of "
            f"{spec.source_text(str(spec.source_split('train')))} holds neither class ids "
            f"(0, 1, ...) nor class names: {sorted(seen, key=str)[:3]} ..."
        )
    _label_column(spec, str(spec.source_split("test")))  # a missing column, named
    raise MergeBenchError(
        f"{spec.where}.classes: column {spec.label!r} of {spec.label_text} has no class "
        "names; list them here"
    )


def check_class_count(spec: DataSpec, expected: int) -> None:
    """A ClassLabel column must have as many classes as the family's head."""
    source = spec.source_split("test")
    dataset = open_split(spec, source)
    names = getattr(dataset.features.get(spec.label), "names", None)
    if names and len(names) != expected:
        raise MergeBenchError(
            f"{spec.where}: {spec.label_text} has {len(names)} classes, the task's class names "
            f"{expected}"
        )


def fingerprint(spec: DataSpec, seed: int, examples: Examples) -> str:
    """sha256 of the data sets' own fingerprints and the rows each split keeps."""
    h = hashlib.sha256(
        repr((spec.task, spec.path, spec.name, spec.data_dir, spec.revision)).encode()
    )
    if spec.files:  # which files, and the classes their string labels are mapped to
        h.update(repr((spec.files, class_names(spec))).encode())
    for split in SPLITS:
        source, rows = split_rows(spec, split, seed, examples)
        h.update(
            f"{split}:{source}:{getattr(open_split(spec, source), '_fingerprint', '')}".encode()
        )
        h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return h.hexdigest()
