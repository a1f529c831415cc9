"""Task sets: real packaged data, seeded stratified splits, fingerprints, metrics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from packaged_data import needs_openclipart

from mergebench.data.embedded import (
    TASKS,
    SplitSizes,
    build_metric,
    get_task,
    load_raw,
    load_splits,
)
from mergebench.data.embedded.sources import (
    FASHION_MNIST_DEFAULT,
    FASHION_MNIST_ENV,
    RawData,
)
from mergebench.data.splits import make_splits
from mergebench.util.errors import MergeBenchError

TEXT = [n for n, t in TASKS.items() if t.modality == "text"]
IMAGE = [n for n, t in TASKS.items() if t.modality == "image"]


FASHION_MNIST_FILES = [
    f"{part}-{kind}-ubyte.gz"
    for part in ("train", "t10k")
    for kind in ("images-idx3", "labels-idx1")
]


def needs_fashion_mnist(name: str) -> None:
    """Skip (with the reason) a test of `fashion_mnist` where Debian's Fashion-MNIST is missing:
    `make test` installs it first (`make data`), which needs root and apt-get."""
    if name != "fashion_mnist":
        return
    root = Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT))
    missing = [f for f in FASHION_MNIST_FILES if not (root / f).is_file()]
    if missing:
        pytest.skip(
            f"Debian's Fashion-MNIST is missing ({missing[0]} not in {root}) and `make data` "
            "could not install it (needs root: apt-get install dataset-fashion-mnist); or set "
            f"{FASHION_MNIST_ENV} to a folder with its IDX .gz files"
        )


def toy(n: int = 100, classes: int = 4) -> RawData:
    labels = np.arange(n) % classes
    return RawData(
        [f"text {i}" for i in range(n)], labels.astype(np.int64), tuple("abcd"[:classes])
    )


def test_task_sets_have_enough_tasks():
    assert len(TEXT) >= 6 and len(IMAGE) >= 4


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_loads_real_data(name):
    needs_fashion_mnist(name)
    needs_openclipart(name)
    raw = load_raw(name)
    assert len(raw) == len(raw.labels) >= 200
    counts = np.bincount(raw.labels, minlength=len(raw.classes))
    assert len(counts) == len(raw.classes) and counts.min() > 0, "every class has examples"
    if isinstance(raw.inputs, list):
        assert all(isinstance(t, str) and t.strip() for t in raw.inputs)
        assert len(set(raw.inputs)) == len(raw.inputs), "duplicates would leak into the test split"
    else:
        assert raw.inputs.dtype == np.uint8 and raw.inputs.ndim in (3, 4), "[N, H, W(, 3)]"
        assert raw.inputs.ndim == 3 or raw.inputs.shape[-1] == 3, "colour is RGB"
        assert raw.inputs.max() > 200, "images scaled to 0-255"


@pytest.mark.parametrize("name", TEXT + IMAGE)
def test_default_sets_have_300_test_examples_where_data_allows(name):
    needs_fashion_mnist(name)
    needs_openclipart(name)
    if name in TEXT:
        splits = load_splits(name, 600, 100, 400, 0)
        assert len(splits.test) >= 300, name
    else:
        splits = load_splits(name, 1000, 100, 400, 0)
        assert len(splits.test) >= (300 if name != "faces" else 60), name


def test_missing_fashion_mnist_skips_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))  # an empty folder
    with pytest.raises(pytest.skip.Exception, match="Fashion-MNIST is missing .*make data"):
        needs_fashion_mnist("fashion_mnist")
    needs_fashion_mnist("mnist")  # other tasks never skip
    for f in FASHION_MNIST_FILES:
        (tmp_path / f).write_bytes(b"")
    needs_fashion_mnist("fashion_mnist")  # present: runs


def test_splits_are_disjoint_stratified_and_seeded():
    raw = toy()
    a = make_splits("toy", raw, SplitSizes(40, 10, 30), seed=0)
    assert (len(a.train), len(a.validation), len(a.test)) == (40, 10, 30)
    sets = [set(a.split(s).inputs) for s in ("train", "validation", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    # Stratified: 30 test examples over 4 balanced classes -> 7 or 8 of each.
    assert set(np.bincount(a.test.labels)) <= {7, 8}
    for text, label in zip(a.test.inputs, a.test.labels, strict=True):
        assert int(text.split()[1]) % 4 == label, "inputs and labels stay paired"
    again = make_splits("toy", raw, SplitSizes(40, 10, 30), seed=0)
    assert again.test.inputs == a.test.inputs and again.fingerprint == a.fingerprint
    other = make_splits("toy", raw, SplitSizes(40, 10, 30), seed=1)
    assert other.test.inputs != a.test.inputs and other.fingerprint != a.fingerprint
    renamed = make_splits("toy2", raw, SplitSizes(40, 10, 30), seed=0)
    assert renamed.test.inputs != a.test.inputs, "tasks do not share one permutation"


def test_small_data_sets_get_proportional_splits():
    s = make_splits("toy", toy(50), SplitSizes(1000, 100, 400), seed=0)
    assert (len(s.test), len(s.validation), len(s.train)) == (15, 5, 30)


def test_fingerprint_sees_labels():
    raw = toy()
    flipped = RawData(raw.inputs, (raw.labels + 1) % 4, raw.classes)
    a = make_splits("toy", raw, SplitSizes(40, 10, 30), 0)
    b = make_splits("toy", flipped, SplitSizes(40, 10, 30), 0)
    assert a.fingerprint != b.fingerprint


def test_metrics_come_from_torchmetrics():
    metric = build_metric("accuracy", 3)
    metric.update(torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 2.0, 0]]), torch.tensor([0, 1, 2]))
    assert float(metric.compute()) == pytest.approx(2 / 3)
    with pytest.raises(MergeBenchError, match="metric"):
        build_metric("auroc", 3)


def test_unknown_task_and_missing_fashion_mnist(tmp_path, monkeypatch):
    with pytest.raises(MergeBenchError, match="unknown task 'nope'"):
        get_task("nope")
    monkeypatch.setenv("MERGEBENCH_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(MergeBenchError, match="dataset-fashion-mnist"):
        get_task("fashion_mnist").load()
