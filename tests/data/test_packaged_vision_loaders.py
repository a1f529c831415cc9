"""The packaged image tasks of issue 23: animal-mnist (PyPI), Noto emoji (npm), Open Clip Art
(Debian) and scikit-image textures: shapes, class counts, determinism, label ranges, the
disk cache, the one-line errors, and the numpy-only unpickler."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle

import numpy as np
import pytest
from packaged_data import needs_openclipart
from PIL import Image

from mergebench.data.embedded import load_raw, load_splits
from mergebench.data.embedded import packaged_vision as pv
from mergebench.data.embedded.numpy_pickle import load_numpy_pickle
from mergebench.util.errors import MergeBenchError

# Examples per class after exact duplicates are dropped (animal-mnist repeats 284 of its
# 10,000 silhouettes, 188 of them birds; emoji 19 identical flags and people).
COUNTS = {
    "animal_mnist": {
        "bear": 937, "bird": 812, "cat": 992, "cow": 996, "dog": 997,
        "elephant": 1000, "giraffe": 1000, "horse": 997, "sheep": 985, "zebra": 1000,
    },
    "emoji": {
        "Smileys & Emotion": 169, "People & Body": 381, "Animals & Nature": 159,
        "Food & Drink": 131, "Travel & Places": 218, "Activities": 85, "Objects": 264,
        "Symbols": 224, "Flags": 261,
    },
    "openclipart": {
        "animals": 280, "computer": 300, "food": 298, "geography": 130, "office": 107,
        "people": 300, "recreation": 298, "shapes": 300, "signs_and_symbols": 300,
        "tools": 121, "transportation": 165,
    },
    "textures": {"brick": 253, "grass": 256, "gravel": 256, "tissue": 254, "stars": 256},
}  # fmt: skip
SHAPES = {
    "animal_mnist": (28, 28),
    "emoji": (64, 64, 3),
    "openclipart": (64, 64, 3),
    "textures": (32, 32),
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_shapes_class_counts_and_label_ranges(name):
    needs_openclipart(name)
    raw = load_raw(name)
    assert raw.inputs.dtype == np.uint8 and raw.inputs.shape[1:] == SHAPES[name]
    assert raw.labels.dtype == np.int64 and raw.labels.min() == 0
    assert raw.labels.max() == len(raw.classes) - 1
    counts = np.bincount(raw.labels, minlength=len(raw.classes))
    assert dict(zip(raw.classes, counts.tolist(), strict=True)) == COUNTS[name]
    flat = raw.inputs.reshape(len(raw), -1)
    assert len(np.unique(flat, axis=0)) == len(raw), "a duplicate would sit in train and test"


@pytest.mark.parametrize("name", ["animal_mnist", "textures"])
def test_uncached_loaders_are_deterministic(name):
    first, second = getattr(pv, name)(), getattr(pv, name)()
    assert np.array_equal(first.inputs, second.inputs)
    assert np.array_equal(first.labels, second.labels) and first.classes == second.classes


def test_emoji_rebuilds_the_same_and_is_cached(tmp_path, monkeypatch):
    cached = pv.emoji()  # from the user's cache or built now
    monkeypatch.setenv(pv.EMOJI_ENV, str(pv.emoji_dir()))  # the npm copy stays where it is
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path))
    built = pv.emoji()
    assert len(list((tmp_path / "packaged").glob("emoji-*.npz"))) == 1
    again = pv.emoji()  # read back from tmp_path
    for other in (cached, again):
        assert np.array_equal(built.inputs, other.inputs)
        assert np.array_equal(built.labels, other.labels) and built.classes == other.classes
    # Transparency is white: every emoji's corner pixel is, but for flags drawn edge to edge.
    corners = built.inputs[:, 0, 0]
    assert (corners == 255).all(axis=1).mean() > 0.9


@pytest.mark.slow
def test_openclipart_rebuilds_the_same(tmp_path, monkeypatch):
    needs_openclipart()
    cached = pv.openclipart()
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path))
    built = pv.openclipart()
    assert np.array_equal(built.inputs, cached.inputs)
    assert np.array_equal(built.labels, cached.labels)


def test_a_changed_source_file_invalidates_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "a.txt"
    source.write_text("one")
    calls = []

    def build():
        calls.append(1)
        return pv.RawData(np.full((2, 4, 4), len(calls), np.uint8), np.array([0, 1]), ("a", "b"))

    assert pv._disk_cached("toy", [source], build).inputs[0, 0, 0] == 1
    assert pv._disk_cached("toy", [source], build).inputs[0, 0, 0] == 1 and len(calls) == 1
    source.write_text("two!")
    assert pv._disk_cached("toy", [source], build).inputs[0, 0, 0] == 2


def test_rgba_is_composited_on_white_and_centred():
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 40, 20))
    out = pv._rgba_on_white(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 255).all() and (out[63, 63] == 255).all(), "margins are white"
    assert tuple(out[32, 32]) == (255, 0, 0), "the drawing fills the width, centred"
    clear = pv._rgba_on_white(Image.new("RGBA", (8, 8), (10, 20, 30, 0)), 16)
    assert (clear == 255).all(), "fully transparent pixels become white, not their colour"


def test_texture_tiles_do_not_overlap_and_are_not_flat():
    photo = np.arange(100 * 70, dtype=np.uint8).reshape(100, 70)
    tiles = list(pv._tiles(photo, 32))
    assert len(tiles) == 3 * 2 and all(t.shape == (32, 32) for t in tiles)
    assert tiles[1][0, 0] == photo[0, 32] and tiles[2][0, 0] == photo[32, 0]
    raw = load_raw("textures")
    assert raw.inputs.reshape(len(raw), -1).std(axis=1).min() >= pv.TEXTURE_MIN_STD


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "animal_mnist"])
def test_test_splits_of_1000_are_available(name):
    from test_tasks import needs_fashion_mnist

    needs_fashion_mnist(name)
    splits = load_splits(name, 1000, 200, 1000, 0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (1000, 200, 1000)
    # The default board's 400-example draw is a different split of the same data.
    assert load_splits(name, 1000, 200, 400, 0).fingerprint != splits.fingerprint


def test_missing_packages_are_one_line_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setenv(pv.EMOJI_ENV, str(tmp_path))
    with pytest.raises(MergeBenchError, match=r"emoji-datasource-google@16.0.0 .*make data") as e:
        pv.emoji()
    assert "\n" not in str(e.value)
    monkeypatch.setenv(pv.OPENCLIPART_ENV, str(tmp_path))
    with pytest.raises(MergeBenchError, match=r"'openclipart'.*make data.*openclipart-png"):
        pv.openclipart()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "animal_mnist" else real(n, *a)
    )
    with pytest.raises(MergeBenchError, match=r"'animal_mnist'.*animal-mnist==0.4.*make data"):
        pv.animal_mnist()


class _Payload:
    """Pickles as a call of os.system: what a tampered data file would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _gzip_pickle(path, value):
    with gzip.open(path, "wb") as f:
        pickle.dump(value, f)
    return path


def test_the_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    marker = tmp_path / "ran"
    evil = _gzip_pickle(tmp_path / "evil.gz", _Payload(marker))
    with pytest.raises(MergeBenchError, match=r"evil\.gz: refused to unpickle: .*system") as e:
        load_numpy_pickle(evil)
    assert "\n" not in str(e.value) and not marker.exists(), "the call never ran"
    objects = _gzip_pickle(tmp_path / "objects.gz", np.array([1, "a"], dtype=object))
    with pytest.raises(MergeBenchError, match=r"objects\.gz: expected a numeric numpy array"):
        load_numpy_pickle(objects)
    plain = tmp_path / "plain.gz"
    plain.write_bytes(b"not gzip")
    with pytest.raises(MergeBenchError, match=r"plain\.gz: not a gzip-pickled numpy array"):
        load_numpy_pickle(plain)
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(load_numpy_pickle(_gzip_pickle(tmp_path / "ok.gz", array)), array)
