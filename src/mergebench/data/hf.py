"""Hugging Face data sets for the paper settings (CLIP's eight vision tasks, GLUE), by hub id
or from a local copy, split into a label-free view for families and a labeled accessor for
the evaluator, exactly as the embedded zoo does.

A task's data is described in its task set (`conf/taskset/*.yaml`, key `data.<task>`): the
hub id and config, or `data_dir` (a `save_to_disk` folder, or a folder of parquet / csv /
json files in the hub's layout), which source split plays our train / validation / test,
the input columns and the label column, and the metric. Or one local file per split
(`train: a.csv`, `test: b.jsonl`, optional `validation:`; `mergebench.data.files`).

Labels may be class ids or strings: string labels are mapped to ids by the task's class
names (configured `classes`, else the sorted labels of the train split), and a label of a
validation or test split that the train split lacks is an error naming the task.

Nothing here holds a label where a merging method could reach it: a family receives
`InputRows`, which open their data set with the input columns only; labels are read by
`HFLabeledData` (the evaluator's accessor) alone. Rows are read lazily, batch by batch, from
the memory-mapped Arrow files, so a 100k-image data set costs no memory up front, and a
split is opened only when first used (a data-free merge never downloads a train split).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mergebench.data.files import check_data_file, is_saved_dataset, open_data_file
from mergebench.data.metrics import HF_METRICS, REGRESSION_METRIC
from mergebench.data.splits import SPLITS
from mergebench.util.errors import MergeBenchError, first_line

# ------------------------------------------------------------------------------ what a task is


@dataclass(frozen=True)
class DataSpec:
    """Where one task's data lives and how to read it (hashable: it keys the caches)."""

    task: str
    path: str | None  # hub id, e.g. tanganke/eurosat or nyu-mll/glue
    name: str | None  # hub config, e.g. cola (GLUE) or cropped_digits (SVHN)
    data_dir: str | None  # a local copy, used instead of the hub when set
    revision: str | None
    inputs: tuple[str, ...]  # input columns: (image,), (sentence,), (sentence1, sentence2)
    label: str
    splits: tuple[tuple[str, str | None], ...]  # our split -> source split; None = from train
    metric: str
    classes: tuple[str, ...] | None  # class names; None = the label column's ClassLabel names
    cache_dir: str | None  # datasets' cache for hub downloads and local folders
    # CLIP only: the prompt set (families/clip_prompts.json; None = the task's name) or templates
    # such as "a photo of a {}." that replace the set's.
    prompts: str | None = None
    templates: tuple[str, ...] | None = None
    # Local files, one per source split (train, validation, test): instead of path/data_dir.
    files: tuple[tuple[str, str], ...] = ()

    @property
    def where(self) -> str:
        return f"taskset.data.{self.task}"

    @property
    def regression(self) -> bool:
        return self.metric == REGRESSION_METRIC

    def source_split(self, split: str) -> str | None:
        return dict(self.splits)[split]

    def source_text(self, source_split: str) -> str:
        """One source split, for messages: its file, or the split of the data set."""
        if self.files:
            return dict(self.files)[source_split]
        return f"split {source_split!r} of {self.label_text}"

    @property
    def local(self) -> bool:
        return bool(self.files or self.data_dir)

    @property
    def label_text(self) -> str:
        """What the data set is, for messages: the local files or folder, or the hub id."""
        if self.files:
            return ", ".join(f for _, f in self.files)
        if self.data_dir:
            return str(self.data_dir)
        return f"{self.path}" + (f" ({self.name})" if self.name else "")


_SPEC_KEYS = {
    "path", "name", "data_dir", "revision", "inputs", "label", "splits", "metric", "classes",
    "prompts", "templates", *SPLITS,
}  # fmt: skip


def _file_splits(where: str, cfg: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """`train: a.csv, test: b.csv` (validation optional), checked; () when none is given."""
    given = [s for s in SPLITS if cfg.get(s) is not None]
    if not given:
        return ()
    for key in ("path", "data_dir", "splits"):
        if cfg.get(key):
            raise MergeBenchError(
                f"{where}.{key}: not with files per split ({', '.join(given)}): the files are "
                "the splits"
            )
    for split in ("train", "test"):
        if cfg.get(split) is None:
            raise MergeBenchError(f"{where}.{split}: missing (the {split} split's file)")
    return tuple((s, check_data_file(cfg[s], f"{where}.{s}")) for s in given)


def parse_data_spec(
    task: str, cfg: Mapping[str, Any] | None, cache_dir: str | None = None
) -> DataSpec:
    """A task's `taskset.data.<task>` section, checked; errors name the key at fault."""
    where = f"taskset.data.{task}"
    if not isinstance(cfg, Mapping):
        raise MergeBenchError(f"{where}: missing (where this task's data set lives)")
    unknown = sorted(set(cfg) - _SPEC_KEYS)
    if unknown:
        raise MergeBenchError(
            f"{where}.{unknown[0]}: unknown key (keys: {', '.join(sorted(_SPEC_KEYS))})"
        )
    files = _file_splits(where, cfg)
    if not files and not cfg.get("path") and not cfg.get("data_dir"):
        raise MergeBenchError(
            f"{where}: set path (a hub id), data_dir (a local copy) or files per split "
            "(train: a.csv, test: b.csv)"
        )
    inputs = cfg.get("inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs or not all(isinstance(c, str) for c in inputs) or len(inputs) > 2:
        raise MergeBenchError(f"{where}.inputs: {inputs!r} is not one or two column names")
    splits = dict(cfg.get("splits") or {})
    if files:  # each file is the source split of its own name
        splits = {s: s for s, _ in files}
    elif cfg.get("data_dir") and not splits:  # a save_to_disk folder of our own splits
        splits = {"train": "train", "test": "test"}
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        raise MergeBenchError(f"{where}.splits.{bad[0]}: unknown split (ours: {', '.join(SPLITS)})")
    for split in ("train", "test"):
        if not splits.get(split):
            raise MergeBenchError(f"{where}.splits.{split}: missing (the source split to use)")
    metric = str(cfg.get("metric") or "accuracy")
    if metric not in HF_METRICS:
        raise MergeBenchError(
            f"{where}.metric: unknown metric {metric!r} (known: {', '.join(HF_METRICS)})"
        )
    classes = cfg.get("classes")
    templates = cfg.get("templates")
    if templates is not None and (
        isinstance(templates, str) or not all(isinstance(t, str) and "{}" in t for t in templates)
    ):
        raise MergeBenchError(
            f"{where}.templates: expected a list of strings with {{}} for the class"
        )
    return DataSpec(
        task=task,
        path=str(cfg["path"]) if cfg.get("path") else None,
        name=str(cfg["name"]) if cfg.get("name") else None,
        data_dir=str(cfg["data_dir"]) if cfg.get("data_dir") else None,
        revision=str(cfg["revision"]) if cfg.get("revision") else None,
        inputs=tuple(str(c) for c in inputs),
        label=str(cfg.get("label") or "label"),
        splits=tuple((s, str(splits[s]) if splits.get(s) else None) for s in SPLITS),
        metric=metric,
        classes=tuple(str(c) for c in classes) if classes else None,
        cache_dir=cache_dir,
        prompts=str(cfg["prompts"]) if cfg.get("prompts") else None,
        templates=tuple(templates) if templates else None,
        files=files,
    )


@dataclass(frozen=True)
class Examples:
    """How many examples each split keeps (None = all of it); seeded like the zoo's splits."""

    train: int | None = None
    validation: int | None = None
    test: int | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Examples:
        cfg = dict(cfg or {})
        for key, value in cfg.items():
            if key not in SPLITS:
                raise MergeBenchError(
                    f"taskset.examples.{key}: unknown split (ours: {', '.join(SPLITS)})"
                )
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise MergeBenchError(
                    f"taskset.examples.{key}: {value!r} is not a positive integer or null"
                )
        return cls(**cfg)

    def of(self, split: str) -> int | None:
        return getattr(self, split)


# ------------------------------------------------------------------------------ loading


def offline() -> bool:
    """Whether the hub is switched off, as `datasets` and `huggingface_hub` see it."""
    try:
        import datasets

        if datasets.config.HF_HUB_OFFLINE:
            return True
    except (ImportError, AttributeError):  # pragma: no cover - older datasets
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _local_folder(spec: DataSpec) -> Path:
    folder = Path(spec.data_dir).expanduser()
    if not folder.exists():
        raise MergeBenchError(f"{spec.where}.data_dir: {folder} not found")
    # A clone of a multi-config hub repo (nyu-mll/glue) keeps each config in its own folder.
    if spec.name and (folder / spec.name).is_dir():
        folder = folder / spec.name
    return folder


def _open_local(spec: DataSpec, source_split: str):
    import datasets

    if spec.files:
        return open_data_file(
            dict(spec.files)[source_split], f"{spec.where}.{source_split}", spec.cache_dir
        )
    folder = _local_folder(spec)
    if is_saved_dataset(folder):
        loaded = datasets.load_from_disk(str(folder))  # written by save_to_disk
        if isinstance(loaded, datasets.DatasetDict):
            if source_split not in loaded:
                raise MergeBenchError(
                    f"{spec.where}.splits: {folder} has no split {source_split!r} "
                    f"(it has {', '.join(loaded)})"
                )
            return loaded[source_split]
        return loaded  # a single saved split
    # A folder of data files in the hub's layout (data/train-*.parquet, ...), read by the
    # same builder that reads the hub copy.
    return datasets.load_dataset(str(folder), split=source_split, cache_dir=spec.cache_dir)


def _open_hub(spec: DataSpec, source_split: str):
    import datasets

    return datasets.load_dataset(
        spec.path, spec.name, split=source_split, revision=spec.revision, cache_dir=spec.cache_dir
    )


@lru_cache(maxsize=128)
def open_split(spec: DataSpec, source_split: str):
    """One source split as a `datasets.Dataset` (memory-mapped), or a one-line error."""
    try:
        if spec.local:
            return _open_local(spec, source_split)
        return _open_hub(spec, source_split)
    except MergeBenchError:
        raise
    except ValueError as err:
        if "split" in str(err).lower():  # "Unknown split "x". Should be one of [...]"
            raise MergeBenchError(
                f"{spec.where}.splits: {spec.label_text} has no split {source_split!r} "
                f"({first_line(err)})"
            ) from None
        raise MergeBenchError(
            f"{spec.where}: cannot read {spec.label_text} ({first_line(err)})"
        ) from None
    except Exception as err:  # datasets raises many types; the user needs one line
        if spec.data_dir:
            raise MergeBenchError(
                f"{spec.where}.data_dir: cannot read {spec.data_dir} ({first_line(err)})"
            ) from None
        mode = "the hub is switched off (HF_HUB_OFFLINE=1)" if offline() else first_line(err)
        raise MergeBenchError(
            f"{spec.where}: data set {spec.label_text!r} is not available: {mode}; it needs a "
            f"network, or a local copy: {spec.where}.data_dir=/path"
        ) from None


def _column_names(dataset) -> list[str]:
    return list(dataset.column_names)


def check_columns(
    spec: DataSpec, dataset, source_split: str, columns: Sequence[str], key: str
) -> None:
    have = _column_names(dataset)
    for column in columns:
        if column not in have:
            raise MergeBenchError(
                f"{spec.where}.{key}: {spec.source_text(source_split)} has no column "
                f"{column!r} (columns: {', '.join(have)})"
            )


def _rng(seed: int, task: str, split: str) -> np.random.Generator:
    # Seeded by the seed, the task and the split, so that tasks do not share permutations.
    return np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode())])


def _subset(n: int, k: int | None, rng: np.random.Generator) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=k, replace=False))


@lru_cache(maxsize=256)
def split_rows(spec: DataSpec, split: str, seed: int, examples: Examples) -> tuple[str, np.ndarray]:
    """Which source split and which of its rows make our `split` (labels are not looked at).

    Without a source validation split, validation rows are carved out of the train split
    (default: a tenth of it) and the train split keeps the rest: the two never overlap.
    """
    if split not in SPLITS:
        raise MergeBenchError(f"split: unknown split {split!r} (choose from {SPLITS})")
    source = spec.source_split(split)
    if source is not None and not (split == "train" and spec.source_split("validation") is None):
        n = len(open_split(spec, source))
        if split == "train":  # a shuffled train split: the first N rows are a random sample
            order = _rng(seed, spec.task, split).permutation(n)
            keep = examples.train
            return source, order if keep is None else order[:keep]
        return source, _subset(n, examples.of(split), _rng(seed, spec.task, split))
    # Validation carved from train, or train minus the carved validation rows.
    train_source = spec.source_split("train")
    n = len(open_split(spec, train_source))
    order = _rng(seed, spec.task, "train").permutation(n)
    n_val = examples.validation if examples.validation is not None else max(1, n // 10)
    n_val = min(n_val, n - 1)
    if split == "validation":
        return train_source, np.sort(order[:n_val])
    rest = order[n_val:]
    return train_source, rest if examples.train is None else rest[: examples.train]


class InputRows(Sequence):
    """The inputs (no label column) of one split of one task, read lazily in batches.

    Indexing with an int gives one input; with a slice or an index array, a list of inputs.
    An input is the value of the single input column (a PIL image, a sentence), or a tuple
    of values for two columns (a sentence pair).
    """

    def __init__(self, spec: DataSpec, split: str, seed: int, examples: Examples) -> None:
        self._spec = spec
        self._split = split
        self._seed = seed
        self._examples = examples
        self._rows: np.ndarray | None = None
        self._data = None

    def _open(self) -> None:
        if self._rows is None:
            source, rows = split_rows(self._spec, self._split, self._seed, self._examples)
            dataset = open_split(self._spec, source)
            check_columns(self._spec, dataset, source, self._spec.inputs, "inputs")
            self._data = dataset.select_columns(list(self._spec.inputs))
            self._rows = rows

    def __len__(self) -> int:
        self._open()
        return len(self._rows)

    def __getitem__(self, index):
        self._open()
        if isinstance(index, int | np.integer):
            return self._fetch(np.asarray([self._rows[index]]))[0]
        return self._fetch(np.asarray(self._rows[index]))

    def _fetch(self, rows: np.ndarray) -> list[Any]:
        if len(rows) == 0:
            return []
        columns = self._data[[int(r) for r in rows]]
        values = [columns[c] for c in self._spec.inputs]
        return list(values[0]) if len(values) == 1 else list(zip(*values, strict=True))


__all__ = [
    "HF_METRICS",
    "REGRESSION_METRIC",
    "DataSpec",
    "Examples",
    "InputRows",
    "check_columns",
    "offline",
    "open_split",
    "parse_data_spec",
    "split_rows",
]
