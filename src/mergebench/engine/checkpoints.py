"""Checkpoint access (lazy, one key at a time): `open_checkpoint` turns a path, a Hugging
Face folder (single or sharded), a torch file or an in-memory state dict into a
`TensorReader`. Methods only ever ask for one key at a time, so the same code serves a small
model and one streamed from disk. The readers: `reader.py` (the base and the in-memory
reader), `safetensors_reader.py`, `torch_files.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch

from mergebench.engine.reader import (
    StateDictReader,
    TensorReader,
    require_regular_file,
)
from mergebench.engine.safetensors_reader import SafetensorsReader
from mergebench.engine.torch_files import TorchFileReader, describe_non_torch_file
from mergebench.util.errors import MergeBenchError, first_line

__all__ = [
    "CheckpointLike",
    "SafetensorsReader",
    "StateDictReader",
    "TensorReader",
    "TorchFileReader",
    "describe_non_torch_file",
    "open_checkpoint",
    "shards_from_index",
]

CheckpointLike = Union[str, Path, Mapping[str, torch.Tensor], "TensorReader"]

_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.bin",
)


def shards_from_index(index_file: Path) -> tuple[list[Path], dict[str, Path]]:
    """The shard files of an index (each a plain name inside the index's folder) and the
    shard each key must come from."""
    require_regular_file(index_file)
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise MergeBenchError(
            f"{index_file}: not a valid shard index ({first_line(err)})"
        ) from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and isinstance(k, str) for k, v in weight_map.items()
    ):
        raise MergeBenchError(f"{index_file}: weight_map must map tensor names to shard files")
    for shard in set(weight_map.values()):
        parts = Path(shard).parts
        if not shard or Path(shard).is_absolute() or ".." in parts or "\\" in shard:
            raise MergeBenchError(
                f"{index_file}: shard {shard!r} is outside the index's folder; not read"
            )
    # `./x` and `x` name one file: open it once (else its keys would seem to be in two shards).
    weight_map = {key: os.path.normpath(shard) for key, shard in weight_map.items()}
    shards = sorted(set(weight_map.values()))
    where = {key: index_file.parent / shard for key, shard in weight_map.items()}
    return [index_file.parent / shard for shard in shards], where


def _open_path(path: Path, role: str) -> TensorReader:
    name = f"{role} ({path})"
    if path.is_dir():
        for candidate in _HF_WEIGHT_FILES:
            if (path / candidate).is_file():
                return _open_path(path / candidate, role)
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) == 1:
            return _open_path(singles[0], role)
        raise MergeBenchError(
            f"{path}: no checkpoint found in folder (looked for {', '.join(_HF_WEIGHT_FILES)})"
        )
    if not path.exists():
        raise MergeBenchError(f"{path}: checkpoint not found ({role})")
    require_regular_file(path)
    if path.name.endswith(".safetensors.index.json"):
        shards, where = shards_from_index(path)
        return SafetensorsReader(shards, name, weight_map=where)
    if path.name.endswith(".index.json"):
        shards, where = shards_from_index(path)
        return TorchFileReader(shards, name, weight_map=where)
    if path.suffix == ".safetensors":
        return SafetensorsReader([path], name)
    if path.suffix in {".pt", ".pth", ".bin", ".ckpt"}:
        return TorchFileReader([path], name)
    raise MergeBenchError(
        f"{path}: unknown checkpoint format (expected .safetensors, .pt/.pth/.bin, or a model folder)"
    )


def open_checkpoint(source: CheckpointLike, role: str = "checkpoint") -> TensorReader:
    """Open a path, a Hugging Face folder, a state dict or an existing source, lazily."""
    if isinstance(source, TensorReader):
        return source
    if isinstance(source, Mapping):
        return StateDictReader(source, name=f"{role} (in-memory state dict)")
    if isinstance(source, (str, Path)):
        return _open_path(Path(source).expanduser(), role)
    raise MergeBenchError(f"{role}: expected a path or a state dict, got {type(source).__name__}")
