"""A task's splits from local files: CSV, JSON lines, Parquet, or a `save_to_disk` folder.

`taskset=local` names one file per split (`taskset.data.<task>.train: a.csv`); each opens as
a memory-mapped `datasets.Dataset` through the builder its extension names, exactly as the
hub's copies are read. Errors name the option (`taskset.data.<task>.train`) and the file.
"""

from __future__ import annotations

from pathlib import Path

from mergebench.util.errors import MergeBenchError, first_line

# Extension -> the `datasets` builder that reads it.
BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
KINDS = "CSV (.csv), JSON lines (.jsonl/.json), Parquet (.parquet) or a save_to_disk folder"


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def check_data_file(value: object, option: str) -> str:
    """The absolute path of a split's file, checked: it exists and is a kind we read."""
    if not isinstance(value, str | Path) or not str(value).strip():
        raise MergeBenchError(f"{option}: {value!r} is not a file path")
    path = Path(str(value)).expanduser().resolve()
    if not path.exists():
        raise MergeBenchError(f"{option}: {path} not found")
    if path.is_dir():
        if not (path / "state.json").is_file():
            raise MergeBenchError(
                f"{option}: {path} is a folder but not one split saved by save_to_disk "
                f"(expected {KINDS})"
            )
    elif path.suffix.lower() not in BUILDERS:
        raise MergeBenchError(f"{option}: {path} is not a data file we read (expected {KINDS})")
    return str(path)


def open_data_file(path: str, option: str, cache_dir: str | None):
    """One split as a `datasets.Dataset`; an empty or unreadable file is one line."""
    import datasets

    file = Path(path)
    try:
        if file.is_dir():
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


__all__ = ["BUILDERS", "KINDS", "check_data_file", "is_saved_dataset", "open_data_file"]
