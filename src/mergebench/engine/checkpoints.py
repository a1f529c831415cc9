"""Checkpoint access (lazy, one key at a time) and bit packing of masks.

A `CheckpointSource` hides where tensors live: a safetensors file (read by offset), a
Hugging Face model folder (single or sharded), a torch `.pt/.bin` state dict (loaded with
`weights_only=True`, memory-mapped when possible), or an in-memory state dict. Methods only
ever ask for one key at a time, so the same code serves a small model and one streamed
from disk.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import struct
import threading
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from mergebench.util.errors import MergeBenchError

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
_SAFETENSORS_ITEMSIZE = {
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
        _SAFETENSORS_DTYPES[_code] = getattr(torch, _name)
# Stored dtypes the tensor math cannot promote (torch has no float8 arithmetic on CPU): a
# checkpoint holding them is refused when it is opened, naming the key, not after a merge.
_UNMERGEABLE_CODES = {"F8_E4M3", "F8_E5M2"}
_UNMERGEABLE_DTYPES = {
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
}


def _unmergeable(where: str, key: str, dtype_name: str) -> MergeBenchError:
    return MergeBenchError(
        f"{where}: tensor {key!r} has dtype {dtype_name}, which mergebench cannot merge "
        "(float8 has no arithmetic here); convert the checkpoint to bf16/fp16/fp32 first"
    )


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
            if value.dtype in _UNMERGEABLE_DTYPES:
                raise _unmergeable(name, key, str(value.dtype).removeprefix("torch."))

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


class SafetensorsSource(CheckpointSource):
    """One or several (sharded) safetensors files, read lazily per key by file offset.

    We parse the (tiny) JSON header ourselves and read each tensor with positional reads
    (`preadv`) instead of memory-mapping the file: the bytes come from the page cache
    straight into the caller's buffer, so streaming a model leaves no resident mapped pages
    behind (a memory map keeps every page it touched in the process's RSS) and several
    threads can read at once without sharing a file position.
    """

    def __init__(
        self, paths: list[Path], name: str, weight_map: Mapping[str, Path] | None = None
    ) -> None:
        self.name = name
        self._paths = paths
        self._files = []
        self._entries: dict[str, _Entry] = {}
        for index, path in enumerate(paths):
            _require_regular_file(path)
            try:
                handle = open(path, "rb")  # noqa: SIM115 - kept open for the source's lifetime
            except FileNotFoundError:
                raise MergeBenchError(f"{path}: checkpoint file not found") from None
            except OSError as err:
                raise MergeBenchError(f"{path}: cannot open checkpoint ({err})") from None
            self._files.append(handle)
            for key, entry in _read_header(handle, path, index).items():
                if key in self._entries:
                    raise MergeBenchError(
                        f"{path}: tensor {key!r} is also in {paths[self._entries[key].file]} "
                        "(a key must live in one shard only)"
                    )
                self._entries[key] = entry
        if weight_map is not None:
            _check_weight_map(weight_map, {k: paths[e.file] for k, e in self._entries.items()})

    def keys(self) -> list[str]:
        return list(self._entries)

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise self._missing(key) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        entry = self._entry(key)
        if entry.dtype is None:
            raise MergeBenchError(f"{self.name}: tensor {key!r} has unsupported dtype {entry.code}")
        return entry.dtype

    def get(self, key: str) -> torch.Tensor:
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self._read(key, out)
        return out

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        if out.dtype == self.dtype(key) and out.is_contiguous() and out.device.type == "cpu":
            self._check_numel(key, out)
            self._read(key, out)  # no conversion: read straight into the caller's buffer
            return out
        return super().read_into(key, out)

    def read_rows_into(self, key: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        self._check_rows(key, out, start)
        native = self.dtype(key)
        direct = out.dtype == native and out.is_contiguous() and out.device.type == "cpu"
        target = out if direct else torch.empty(out.shape, dtype=native)
        row_bytes = math.prod(out.shape[1:]) * target.element_size()
        self._read(key, target, skip=start * row_bytes)  # the rows' bytes only
        if not direct:
            out.copy_(target)
        return out

    def _read(self, key: str, out: torch.Tensor, skip: int = 0) -> None:
        """Fill `out` with the tensor's bytes from `skip` on (all of them by default)."""
        entry = self._entry(key)
        if entry.nbytes == 0 or out.numel() == 0:
            return
        path = self._paths[entry.file]
        try:
            _pread_exact(self._files[entry.file], _byte_view(out), entry.offset + skip)
        except OSError as err:
            raise MergeBenchError(f"{path}: cannot read tensor {key!r} ({err})") from None
        except EOFError:
            raise MergeBenchError(f"{path}: file ends inside tensor {key!r} (truncated?)") from None

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def files(self) -> list[Path]:
        return list(self._paths)

    def close(self) -> None:
        for handle in self._files:
            handle.close()

    def __del__(self) -> None:
        for handle in getattr(self, "_files", []):
            handle.close()


@dataclass(frozen=True)
class _Entry:
    file: int  # index into the source's files
    code: str  # safetensors dtype code, e.g. "F32"
    dtype: torch.dtype | None  # None: a dtype torch cannot hold (reported on use)
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def _read_header(handle, path: Path, file_index: int) -> dict[str, _Entry]:
    """Parse and check a safetensors header: `u64 n`, `n` bytes of JSON, then the data."""

    def bad(reason: str) -> MergeBenchError:
        return MergeBenchError(f"{path}: not a readable safetensors file ({reason})")

    size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise bad("shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(size - 8, 100 * 1024 * 1024):
        raise bad(f"header length {header_len} does not fit the file")
    try:
        header = json.loads(handle.read(header_len))
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"invalid JSON header: {err}") from None
    except RecursionError:  # a header nested thousands of levels deep
        raise bad("JSON header nested too deeply") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_start = 8 + header_len
    entries: dict[str, _Entry] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        # Integers only, as safetensors itself demands: int("44") would read a string shape
        # as [4, 4] and int(2.7) a float as 2.
        try:
            code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError):
            raise bad(f"malformed entry for tensor {key!r}") from None
        if not (_int_list(shape) and _int_list(offsets) and len(offsets) == 2):
            raise bad(f"malformed entry for tensor {key!r} (shape and offsets must be integers)")
        shape = tuple(shape)
        begin, end = offsets
        if not isinstance(code, str) or code not in _SAFETENSORS_ITEMSIZE:
            raise bad(f"tensor {key!r} has unknown dtype {code!r}")
        if code in _UNMERGEABLE_CODES:
            raise _unmergeable(str(path), key, code)
        dtype = _SAFETENSORS_DTYPES.get(code)
        itemsize = _SAFETENSORS_ITEMSIZE[code]
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= size - data_start:
            raise bad(f"tensor {key!r} lies outside the file")
        if end - begin != math.prod(shape) * itemsize:
            raise bad(f"tensor {key!r}: {end - begin} bytes for shape {list(shape)} of {code}")
        entries[key] = _Entry(file_index, code, dtype, shape, data_start + begin, end - begin)
        if end > begin:
            spans.append((begin, end, key))
    spans.sort()
    reach, owner = 0, ""
    for begin, end, key in spans:
        if begin < reach:
            raise bad(f"tensors {owner!r} and {key!r} overlap")
        if end > reach:
            reach, owner = end, key
    return entries


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


_SEEK_LOCK = threading.Lock()


def _pread_exact(handle, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` from `offset` (positional reads: safe from several threads at once)."""
    fd = handle.fileno()
    while buffer.nbytes:
        chunk = buffer[: 1 << 30]  # one read is capped near 2 GiB
        if hasattr(os, "preadv"):
            count = os.preadv(fd, [chunk], offset)
        else:  # platforms without preadv: seek + read under a lock
            with _SEEK_LOCK:
                handle.seek(offset)
                count = handle.readinto(chunk)
        if not count:
            raise EOFError
        buffer, offset = buffer[count:], offset + count


def _require_regular_file(path: Path) -> None:
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


def describe_non_torch_file(path: Path) -> str | None:
    """What `path` is when it cannot be a torch checkpoint (empty, text, safetensors, other
    bytes), else None. Torch writes a zip archive, or (legacy format) a pickle, whose first
    byte is the PROTO opcode 0x80: anything else would only earn torch's "invalid load key"
    or advice to unpickle it."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not head:
        return "is empty (0 bytes), not a torch checkpoint"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if len(head) > 9 and head[8:9] == b"{" and head[9:10] in (b'"', b"}"):
        return "is a safetensors file, not a torch file (name it .safetensors)"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "is a text file, not a torch checkpoint"
        except UnicodeDecodeError as err:
            if err.start >= len(head) - 3:  # a character cut by the 512-byte window
                return "is a text file, not a torch checkpoint"
    return "is not a torch checkpoint (neither a zip archive nor a pickle)"


def _unsafe_pickle_message(path: Path) -> str:
    return (
        f"{path}: holds Python code or objects besides tensors, so it was not loaded "
        "(loading it could run that code); if you trust it, convert it once to safetensors: "
        f"mergebench-convert --trust-pickle {path} {path.with_suffix('.safetensors')}"
    )


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """`torch.load` that never unpickles arbitrary objects, memory-mapped when possible."""
    _require_regular_file(path)
    what = describe_non_torch_file(path)
    if what is not None:
        raise MergeBenchError(f"{path}: {what}")
    mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own advice would be wrong here
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise MergeBenchError(_unsafe_pickle_message(path)) from None
        raise MergeBenchError(f"{path}: not a readable torch file ({_first(err)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError) as err:
        raise MergeBenchError(
            f"{path}: cannot load as a torch state dict with weights_only=True ({_first(err)})"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # Lightning / many training scripts wrap it once
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MergeBenchError(f"{path}: expected a state dict of tensors")
    return dict(obj)


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class TorchFileSource(StateDictSource):
    """One or several (sharded) torch `.pt/.bin` state dict files."""

    def __init__(
        self, paths: list[Path], name: str, weight_map: Mapping[str, Path] | None = None
    ) -> None:
        state: dict[str, torch.Tensor] = {}
        owner: dict[str, Path] = {}
        for path in paths:
            for key, tensor in _torch_load(path).items():
                if key in state:
                    raise MergeBenchError(
                        f"{path}: tensor {key!r} is also in {owner[key]} "
                        "(a key must live in one shard only)"
                    )
                state[key], owner[key] = tensor, path
        if weight_map is not None:
            _check_weight_map(weight_map, owner)
        super().__init__(state, name=name)
        self._paths = paths

    def files(self) -> list[Path]:
        return list(self._paths)


def shards_from_index(index_file: Path) -> tuple[list[Path], dict[str, Path]]:
    """The shard files of an index (each a plain name inside the index's folder) and the
    shard each key must come from."""
    _require_regular_file(index_file)
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise MergeBenchError(f"{index_file}: not a valid shard index ({_first(err)})") from None
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


def _check_weight_map(weight_map: Mapping[str, Path], found: Mapping[str, Path]) -> None:
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
    _require_regular_file(path)
    if path.name.endswith(".safetensors.index.json"):
        shards, where = shards_from_index(path)
        return SafetensorsSource(shards, name, weight_map=where)
    if path.name.endswith(".index.json"):
        shards, where = shards_from_index(path)
        return TorchFileSource(shards, name, weight_map=where)
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
    raise MergeBenchError(f"{role}: expected a path or a state dict, got {type(source).__name__}")
