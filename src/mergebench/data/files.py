"""A task's splits from local files: CSV, JSON lines, Parquet, a `save_to_disk` folder, or
an image folder (`DIR/<class>/*.png`).

`taskset=local` names one file per split (`taskset.data.<task>.train: a.csv`); each opens as
a memory-mapped `datasets.Dataset` through the builder its extension names, exactly as the
hub's copies are read (images: an `Image` column of a saved or Parquet data set). An image
folder is read by `datasets`' `imagefolder` builder, its columns `image` and `label`, the
label being the class folder's name (a string label: mapped to ids as any other, so the
train and test folders need not hold the same classes). Errors name the option
(`taskset.data.<task>.train`) and the file.
"""

from __future__ import annotations

from pathlib import Path

from mergebench.util.errors import MergeBenchError, first_line

# Extension -> the `datasets` builder that reads it.
BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
KINDS = (
    "CSV (.csv), JSON lines (.jsonl/.json), Parquet (.parquet), a save_to_disk folder or an "
    "image folder (DIR/<class>/*.png)"
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def is_image_folder(folder: Path) -> bool:
    """A folder of class folders holding images (`DIR/<class>/*.png`)."""
    return any(
        f.suffix.lower() in IMAGE_SUFFIXES
        for sub in folder.iterdir()
        if sub.is_dir()
        for f in sub.iterdir()
    )


def check_data_file(value: object, option: str) -> str:
    """The absolute path of a split's file, checked: it exists and is a kind we read."""
    if not isinstance(value, str | Path) or not str(value).strip():
        raise MergeBenchError(f"{option}: {value!r} is not a file path")
    path = Path(str(value)).expanduser().resolve()
    if not path.exists():
        raise MergeBenchError(f"{option}: {path} not found")
    if path.is_dir():
        if not (path / "state.json").is_file() and not is_image_folder(path):
            raise MergeBenchError(
                f"{option}: {path} is a folder but neither one split saved by save_to_disk "
                f"nor class folders of images (expected {KINDS})"
            )
    elif path.suffix.lower() not in BUILDERS:
        raise MergeBenchError(f"{option}: {path} is not a data file we read (expected {KINDS})")
    return str(path)


def open_data_file(path: str, option: str, cache_dir: str | None):
    """One split as a `datasets.Dataset`; an empty or unreadable file is one line."""
    import datasets

    file = Path(path)
    try:
        if file.is_dir() and not is_saved_dataset(file):
            dataset = _named_labels(
                datasets.load_dataset(
                    "imagefolder", data_dir=str(file), split="train", cache_dir=cache_dir
                )
            )
        elif file.is_dir():
            dataset = datasets.load_from_disk(str(file))
            if isinstance(dataset, datasets.DatasetDict):
                raise MergeBenchError(
                    f"{option}: {file} holds several splits ({', '.join(dataset)}); name one "
                    "split's folder"
                )
        else:
            builder = BUILDERS[file.suffix.lower()]
            dataset = datasets.load_dataset(
                builder, data_files={"rows": str(file)}, split="rows", cache_dir=cache_dir
            )
    except MergeBenchError:
        raise
    except Exception as err:  # datasets and its readers raise many types
        raise MergeBenchError(f"{option}: cannot read {file} ({first_line(err)})") from None
    if len(dataset) == 0:
        raise MergeBenchError(f"{option}: {file} has no rows")
    return dataset


def _named_labels(dataset):
    """An image folder's `ClassLabel` ids (numbered per folder) as their class names."""
    names = getattr(dataset.features.get("label"), "names", None)
    if not names:
        return dataset
    labels = [names[i] for i in dataset["label"]]
    return dataset.remove_columns("label").add_column("label", labels)


__all__ = [
    "BUILDERS",
    "KINDS",
    "check_data_file",
    "is_image_folder",
    "is_saved_dataset",
    "open_data_file",
]
