"""Image tasks from packaged data beyond the MNIST family (issue 23): animal-mnist (PyPI),
Google's Noto emoji (npm `emoji-datasource-google`), Debian's Open Clip Art PNGs and
scikit-image's texture photographs.

Each loader returns every usable example as `RawData` with uint8 images of one size:
`[N, H, W]` grayscale or `[N, H, W, 3]` RGB where the source has colour (transparency is
composited on white). Loaders are pure and deterministic (any subsampling uses a fixed
generator); the seeded splits happen in `splits.py`. Sources, licences and counts are in
docs/benchmark.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from mergebench.data.embedded.numpy_pickle import load_numpy_pickle
from mergebench.data.embedded.sources import package_dir
from mergebench.data.splits import RawData
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import atomic_file
from mergebench.util.hashing import stable_hash
from mergebench.util.paths import cache_root

EMOJI_ENV = "MERGEBENCH_EMOJI_DIR"
EMOJI_PACKAGE = "emoji-datasource-google"
EMOJI_VERSION = "16.0.0"
OPENCLIPART_ENV = "MERGEBENCH_OPENCLIPART_DIR"
OPENCLIPART_DEFAULT = "/usr/share/openclipart/png"
MAKE_DATA = "install with `make data`"
# Bump when a loader's output changes: old cache files are then ignored.
CACHE_FORMAT = 1


def _rgba_on_white(image, size: int) -> np.ndarray:
    """A PIL image as `size` x `size` RGB uint8: transparency composited on white, the
    longer side scaled to `size` (aspect kept), centred on a white square."""
    from PIL import Image

    rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    w, h = flat.size
    scale = size / max(w, h)
    resized = flat.convert("RGB").resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
    )
    square = Image.new("RGB", (size, size), (255, 255, 255))
    square.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return np.asarray(square, dtype=np.uint8)


def _unique(images: list[np.ndarray], names: list[str], classes: tuple[str, ...]) -> RawData:
    """Drop exact duplicate images (and images seen under two classes), so that no test image
    is also a training image; labels index `classes`."""
    first: dict[bytes, str] = {}
    conflicting: set[bytes] = set()
    keys = [hashlib.sha256(im.tobytes()).digest() for im in images]
    for key, name in zip(keys, names, strict=True):
        if key in first and first[key] != name:
            conflicting.add(key)
        first.setdefault(key, name)
    seen: set[bytes] = set()
    kept = []
    for i, key in enumerate(keys):
        if key in conflicting or key in seen:
            continue
        seen.add(key)
        kept.append(i)
    index = {c: i for i, c in enumerate(classes)}
    return RawData(
        inputs=np.stack([images[i] for i in kept]),
        labels=np.array([index[names[i]] for i in kept], dtype=np.int64),
        classes=classes,
    )


def _cap(items: list, cap: int, seed: int) -> list:
    """At most `cap` of `items`, drawn with a fixed generator and kept in their order."""
    if len(items) <= cap:
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=cap, replace=False))
    return [items[i] for i in keep]


def _disk_cached(task: str, files: list[Path], build: Callable[[], RawData]) -> RawData:
    """`build()`, cached as .npz under `$MERGEBENCH_CACHE/packaged/`, keyed by the source
    files (path, size, mtime): decoding thousands of PNGs takes a minute on 2 loaded cores."""
    listing = []
    for f in files:
        stat = f.stat()
        listing.append([str(f), stat.st_size, stat.st_mtime_ns])
    key = stable_hash({"format": CACHE_FORMAT, "task": task, "files": listing})[:32]
    path = cache_root() / "packaged" / f"{task}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return RawData(z["inputs"], z["labels"], tuple(str(c) for c in z["classes"]))
    data = build()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, inputs=data.inputs, labels=data.labels, classes=np.array(data.classes))

    atomic_file(path, write)
    return data


# ---------------------------------------------------------------- animal-mnist (PyPI, MIT)

# The package's label order (alphabetical; checked by eye on a montage of each label).
ANIMAL_CLASSES = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)  # fmt: skip


def animal_mnist() -> RawData:
    """animal-mnist 0.4: 10,000 28x28 grayscale animal silhouettes, 1,000 per class. Its
    arrays are pickles, read with the numpy-only unpickler (never a plain pickle.load)."""
    hint = f"pip install --no-deps animal-mnist==0.4, or {MAKE_DATA}"
    root = package_dir("animal_mnist", "animal_mnist", hint) / "data" / "Animal_MNIST"
    images = load_numpy_pickle(root / "animal_data_version_3.gz")
    labels = load_numpy_pickle(root / "animal_label_version_3.gz").astype(np.int64)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise MergeBenchError(
            f"task 'animal_mnist': {root} holds images {images.dtype}{list(images.shape)} and "
            f"{len(labels)} labels, expected uint8 [N, 28, 28] and N labels"
        )
    names = [ANIMAL_CLASSES[i] for i in labels]
    return _unique(list(images), names, ANIMAL_CLASSES)


# ---------------------------------------------------------------- emoji (npm, Apache-2.0 images)

EMOJI_SIZE = 64
EMOJI_MIN_PER_CLASS = 50  # drops "Component" (5 skin-tone and hair swatches, not emoji)


def emoji_dir() -> Path:
    """Where `make data` installs the npm package (or `$MERGEBENCH_EMOJI_DIR`)."""
    env = os.environ.get(EMOJI_ENV)
    if env:
        return Path(env).expanduser()
    return cache_root() / "npm" / "node_modules" / EMOJI_PACKAGE


def emoji() -> RawData:
    """Google's Noto emoji at 64 px (the base emoji; skin-tone variants left out as near
    copies), labelled by their Unicode category; categories under 50 emoji are dropped."""
    root = emoji_dir()
    meta = root / "emoji.json"
    if not meta.is_file():
        raise MergeBenchError(
            f"task 'emoji': npm {EMOJI_PACKAGE}@{EMOJI_VERSION} is not in {root} ({MAKE_DATA} / "
            f"npm install --prefix {root.parent.parent} {EMOJI_PACKAGE}@{EMOJI_VERSION}, "
            f"or set {EMOJI_ENV})"
        )
    files = [meta, *sorted((root / "img" / "google" / "64").glob("*.png"))]
    return _disk_cached("emoji", files, lambda: _read_emoji(root))


def _read_emoji(root: Path) -> RawData:
    from PIL import Image

    entries = sorted(
        (e for e in json.loads((root / "emoji.json").read_text()) if e.get("has_img_google")),
        key=lambda e: e["sort_order"],
    )
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["category"]] = counts.get(e["category"], 0) + 1
    classes = tuple(c for c in counts if counts[c] >= EMOJI_MIN_PER_CLASS)  # Unicode order
    images, names = [], []
    for e in entries:
        if e["category"] in classes:
            with Image.open(root / "img" / "google" / "64" / e["image"]) as im:
                images.append(_rgba_on_white(im, EMOJI_SIZE))
            names.append(e["category"])
    return _unique(images, names, classes)


# ---------------------------------------------------------------- Open Clip Art (Debian, public domain)

CLIPART_SIZE = 64
CLIPART_MAX_PER_CLASS = 300  # `computer` (1,797) and `shapes` (1,582) would swamp the rest
# Top-level folders with 100+ drawings, less `special` and `unsorted` (no subject).
CLIPART_CLASSES = (
    "animals", "computer", "food", "geography", "office", "people", "recreation", "shapes",
    "signs_and_symbols", "tools", "transportation",
)  # fmt: skip


CLIPART_MAX_SIDE = 4096  # a few drawings are rendered at up to 25,000 px: gigabytes to decode


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, without decoding the image."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise MergeBenchError(f"task 'openclipart': {path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _clipart_files(root: Path, category: str) -> list[Path]:
    """The category's drawings: regular files only (Debian links a drawing into other
    folders as well; a link is not a second example) of at most 4096 px a side, by path."""
    files = sorted(p for p in (root / category).rglob("*.png") if not p.is_symlink())
    return [p for p in files if max(_png_size(p)) <= CLIPART_MAX_SIDE]


def openclipart() -> RawData:
    """Open Clip Art Library drawings (Debian `openclipart-png`) by top-level folder, as
    64 px RGB on white, at most 300 per class (a fixed draw)."""
    root = Path(os.environ.get(OPENCLIPART_ENV, OPENCLIPART_DEFAULT))
    if not (root / "animals").is_dir():
        raise MergeBenchError(
            f"task 'openclipart': no Open Clip Art PNGs in {root} ({MAKE_DATA} / apt-get "
            f"install openclipart-png, or set {OPENCLIPART_ENV})"
        )
    files = sorted(p for c in CLIPART_CLASSES for p in (root / c).rglob("*.png"))
    return _disk_cached("openclipart", files, lambda: _read_openclipart(root))


def _read_openclipart(root: Path) -> RawData:
    from PIL import Image

    images, names = [], []
    for i, category in enumerate(CLIPART_CLASSES):
        for path in _cap(_clipart_files(root, category), CLIPART_MAX_PER_CLASS, seed=i):
            with Image.open(path) as im:
                images.append(_rgba_on_white(im, CLIPART_SIZE))
            names.append(category)
    return _unique(images, names, CLIPART_CLASSES)


# ---------------------------------------------------------------- textures (scikit-image, BSD)

TEXTURE_SIZE = 32
TEXTURE_MAX_PER_CLASS = 256  # one 512x512 photograph's worth of tiles
TEXTURE_MIN_STD = 4.0  # a flat tile (empty sky between stars) carries no texture
# skimage.data photographs that are one texture edge to edge (and ship in the wheel).
TEXTURE_CLASSES = ("brick", "grass", "gravel", "tissue", "stars")
_TEXTURE_SOURCES = {
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "tissue": "immunohistochemistry",
    "stars": "hubble_deep_field",
}


def _tiles(image: np.ndarray, size: int) -> Iterable[np.ndarray]:
    """Non-overlapping `size` x `size` tiles in row-major order (overlapping crops would put
    the same pixels in training and test)."""
    for top in range(0, image.shape[0] - size + 1, size):
        for left in range(0, image.shape[1] - size + 1, size):
            yield image[top : top + size, left : left + size]


def textures() -> RawData:
    """32x32 grayscale tiles of five scikit-image texture photographs (brick, grass, gravel,
    immunohistochemistry tissue, Hubble deep field stars); colour is dropped so that the
    task is texture, not hue. Flat tiles are left out; at most 256 per class (a fixed draw)."""
    import skimage.data
    from skimage.color import rgb2gray

    images, names = [], []
    for i, name in enumerate(TEXTURE_CLASSES):
        photo = getattr(skimage.data, _TEXTURE_SOURCES[name])()
        if photo.ndim == 3:
            photo = np.round(rgb2gray(photo[..., :3]) * 255.0).astype(np.uint8)
        tiles = [t for t in _tiles(photo, TEXTURE_SIZE) if t.std() >= TEXTURE_MIN_STD]
        for tile in _cap(tiles, TEXTURE_MAX_PER_CLASS, seed=i):
            images.append(np.ascontiguousarray(tile))
            names.append(name)
    return _unique(images, names, TEXTURE_CLASSES)


__all__ = [
    "ANIMAL_CLASSES",
    "CLIPART_CLASSES",
    "EMOJI_ENV",
    "OPENCLIPART_ENV",
    "TEXTURE_CLASSES",
    "animal_mnist",
    "emoji",
    "emoji_dir",
    "openclipart",
    "textures",
]
