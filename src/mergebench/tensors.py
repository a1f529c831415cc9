"""Checkpoint access (lazy, one key at a time) and bit packing of masks.

A `CheckpointSource` hides where tensors live: a safetensors file (memory-mapped), a
Hugging Face model folder (single or sharded), a torch `.pt/.bin` state dict (loaded with
`weights_only=True`, memory-mapped when possible), or an in-memory state dict. Methods only
ever ask for one key at a time, so the same code serves a small model and one streamed
from disk.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open

from mergebench.errors import MergeBenchError

CheckpointLike = Union[str, Path, Mapping[str, torch.Tensor], "CheckpointSource"]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Names a Hugging Face folder may hold, in the order we prefer them.
_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.bin",
)


class CheckpointSource:
    """Read-only, per-key access to one checkpoint."""

    name: str

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def files(self) -> list[Path]:
        """Files backing this checkpoint (empty for in-memory state dicts)."""
        return []

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def state_dict(self, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in (self.keys() if keys is None else keys)}

    def _missing(self, key: str) -> MergeBenchError:
        return MergeBenchError(f"{self.name}: no tensor named {key!r}")


class StateDictSource(CheckpointSource):
    """An in-memory state dict (tensors are used as they are, never copied here)."""

    def __init__(self, state: Mapping[str, torch.Tensor], name: str = "<in-memory>") -> None:
        self.name = name
        self._state = dict(state)
        for key, value in self._state.items():
            if not isinstance(value, torch.Tensor):
                raise MergeBenchError(
                    f"{name}: value of {key!r} is {type(value).__name__}, expected a tensor"
                )

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor(key).dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensor(key)

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._state[key]
        except KeyError:
            raise self._missing(key) from None


class SafetensorsSource(CheckpointSource):
    """One or several (sharded) safetensors files, memory-mapped, read lazily per key."""

    def __init__(self, paths: list[Path], name: str) -> None:
        self.name = name
        self._paths = paths
        self._handles = []
        self._where: dict[str, int] = {}
        for index, path in enumerate(paths):
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except FileNotFoundError:
                raise MergeBenchError(f"{path}: checkpoint file not found") from None
            except Exception as err:  # safetensors raises its own error types
                raise MergeBenchError(f"{path}: not a readable safetensors file ({err})") from None
            self._handles.append(handle)
            for key in handle.keys():
                self._where[key] = index

    def keys(self) -> list[str]:
        return list(self._where)

    def _handle(self, key: str):
        try:
            return self._handles[self._where[key]]
        except KeyError:
            raise self._missing(key) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        code = self._handle(key).get_slice(key).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise MergeBenchError(f"{self.name}: tensor {key!r} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle(key).get_tensor(key)
        except MergeBenchError:
            raise
        except Exception as err:
            raise MergeBenchError(f"{self.name}: cannot read tensor {key!r} ({err})") from None

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def files(self) -> list[Path]:
        return list(self._paths)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """`torch.load` that never unpickles arbitrary objects, memory-mapped when possible."""
    if not path.is_file():
        raise MergeBenchError(f"{path}: checkpoint file not found")
    mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MergeBenchError(
            f"{path}: cannot load as a torch state dict with weights_only=True ({first})"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # Lightning / many training scripts wrap it once
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MergeBenchError(f"{path}: expected a state dict of tensors")
    return dict(obj)


class TorchFileSource(StateDictSource):
    """One or several (sharded) torch `.pt/.bin` state dict files."""

    def __init__(self, paths: list[Path], name: str) -> None:
        state: dict[str, torch.Tensor] = {}
        for path in paths:
            state.update(_torch_load(path))
        super().__init__(state, name=name)
        self._paths = paths

    def files(self) -> list[Path]:
        return list(self._paths)


def _shards_from_index(index_file: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MergeBenchError(f"{index_file}: not a valid shard index ({err})") from None
    shards = sorted(set(weight_map.values()))
    return [index_file.parent / shard for shard in shards]


def _open_path(path: Path, role: str) -> CheckpointSource:
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
    if path.name.endswith(".safetensors.index.json"):
        return SafetensorsSource(_shards_from_index(path), name)
    if path.name.endswith(".index.json"):
        return TorchFileSource(_shards_from_index(path), name)
    if path.suffix == ".safetensors":
        return SafetensorsSource([path], name)
    if path.suffix in {".pt", ".pth", ".bin", ".ckpt"}:
        return TorchFileSource([path], name)
    raise MergeBenchError(
        f"{path}: unknown checkpoint format (expected .safetensors, .pt/.pth/.bin, or a model folder)"
    )


def open_checkpoint(source: CheckpointLike, role: str = "checkpoint") -> CheckpointSource:
    """Open a path, a Hugging Face folder, a state dict or an existing source, lazily."""
    if isinstance(source, CheckpointSource):
        return source
    if isinstance(source, Mapping):
        return StateDictSource(source, name=f"{role} (in-memory state dict)")
    if isinstance(source, (str, Path)):
        return _open_path(Path(source).expanduser(), role)
    raise MergeBenchError(
        f"{role}: expected a path or a state dict, got {type(source).__name__}"
    )


# --- bit packing --------------------------------------------------------------------------
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor `[N, *shape]` into uint8 `[N, ceil(numel/8)]` (little bit order)."""
    flat = mask.reshape(mask.shape[0], -1).to(torch.uint8)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    groups = flat.view(flat.shape[0], -1, 8)
    # An 8-term sum of distinct powers of two fits in uint8 exactly.
    return (groups * _BIT_WEIGHTS).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits` for one row: uint8 `[ceil(numel/8)]` -> bool `shape`."""
    numel = math.prod(shape)
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_WEIGHTS).ne(0)
    return bits.reshape(*packed.shape[:-1], -1)[..., :numel].reshape(*packed.shape[:-1], *shape)
