"""What every checkpoint reader is: read-only, per-key access to one checkpoint (the
engine's `TensorReader`), the in-memory one, and the checks every reader shares (dtypes that
cannot be merged, regular files only, a shard index that lists exactly the keys).

The file formats live beside: `safetensors_reader.py` (read by offset) and `torch_files.py`
(`.pt/.bin` with `weights_only=True`); `checkpoints.py` opens any of them from a path.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from mergebench.util.errors import MergeBenchError

SAFETENSORS_DTYPES = {
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
SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
for _code, _name in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _name):  # newer torch only
        SAFETENSORS_DTYPES[_code] = getattr(torch, _name)
# Stored dtypes the tensor math cannot promote (torch has no float8 arithmetic on CPU): a
# checkpoint holding them is refused when it is opened, naming the key, not after a merge.
UNMERGEABLE_CODES = {"F8_E4M3", "F8_E5M2"}
UNMERGEABLE_DTYPES = {
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
}


def unmergeable_dtype(where: str, key: str, dtype_name: str) -> MergeBenchError:
    return MergeBenchError(
        f"{where}: tensor {key!r} has dtype {dtype_name}, which mergebench cannot merge "
        "(float8 has no arithmetic here); convert the checkpoint to bf16/fp16/fp32 first"
    )


# Names a Hugging Face folder may hold, in the order we prefer them.
class TensorReader:
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

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor `key` into the preallocated `out` (same number of entries; converted to
        `out`'s dtype and device). Streaming reuses its buffers through this."""
        self._check_numel(key, out)
        out.copy_(self.get(key).reshape(out.shape))
        return out

    def read_rows_into(self, key: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Copy rows `start : start + len(out)` of tensor `key` into `out` (converted to its
        dtype): a vocabulary view reads the rows it needs, never a copy of the whole matrix."""
        self._check_rows(key, out, start)
        out.copy_(self.get(key)[start : start + out.shape[0]])
        return out

    def _check_rows(self, key: str, out: torch.Tensor, start: int) -> None:
        shape = self.shape(key)
        if not shape or tuple(out.shape[1:]) != tuple(shape[1:]) or start + out.shape[0] > shape[0]:
            raise MergeBenchError(
                f"{self.name}: tensor {key!r} has shape {list(shape)}, cannot read rows "
                f"{start}..{start + (out.shape[0] if out.dim() else 0)} of shape {list(out.shape)}"
            )

    def _check_numel(self, key: str, out: torch.Tensor) -> None:
        if out.numel() != self.numel(key):
            raise MergeBenchError(
                f"{self.name}: tensor {key!r} has shape {list(self.shape(key))}, "
                f"buffer has {out.numel()} entries"
            )

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


class StateDictReader(TensorReader):
    """An in-memory state dict (tensors are used as they are, never copied here)."""

    def __init__(self, state: Mapping[str, torch.Tensor], name: str = "<in-memory>") -> None:
        self.name = name
        self._state = dict(state)
        for key, value in self._state.items():
            if not isinstance(value, torch.Tensor):
                raise MergeBenchError(
                    f"{name}: value of {key!r} is {type(value).__name__}, expected a tensor"
                )
            if value.dtype in UNMERGEABLE_DTYPES:
                raise unmergeable_dtype(name, key, str(value.dtype).removeprefix("torch."))

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor(key).dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensor(key)

    def read_rows_into(self, key: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        self._check_rows(key, out, start)
        out.copy_(self._tensor(key)[start : start + out.shape[0]])  # a slice: no copy first
        return out

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._state[key]
        except KeyError:
            raise self._missing(key) from None


def require_regular_file(path: Path) -> None:
    """A FIFO, socket or device would block a reader forever or stream garbage: refuse it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MergeBenchError(f"{path}: checkpoint file not found") from None
    except OSError as err:
        raise MergeBenchError(f"{path}: cannot open checkpoint ({err.strerror or err})") from None
    if stat.S_ISDIR(mode):
        raise MergeBenchError(f"{path}: is a folder, expected a checkpoint file")
    if not stat.S_ISREG(mode):
        raise MergeBenchError(f"{path}: not a regular file (a pipe or device?); not read")


def check_weight_map(weight_map: Mapping[str, Path], found: Mapping[str, Path]) -> None:
    """Every key of the index must be in the shard the index names, and nowhere else; every
    key the shards hold must be in the index (the index is the checkpoint's key list)."""
    for key, path in found.items():
        if key not in weight_map:
            raise MergeBenchError(
                f"{path}: holds tensor {key!r}, which the shard index does not list"
            )
    for key, shard in weight_map.items():
        if key not in found:
            raise MergeBenchError(f"{shard}: lacks tensor {key!r}, which the shard index lists")
        if found[key] != shard:
            raise MergeBenchError(
                f"{found[key]}: holds tensor {key!r}, which the shard index puts in {shard.name}"
            )
