"""Safetensors files (one, or the shards of an index) read lazily per key by file offset."""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mergebench.engine.reader import (
    SAFETENSORS_DTYPES,
    SAFETENSORS_ITEMSIZE,
    UNMERGEABLE_CODES,
    TensorReader,
    check_weight_map,
    require_regular_file,
    unmergeable_dtype,
)
from mergebench.util.errors import MergeBenchError


class SafetensorsReader(TensorReader):
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
            require_regular_file(path)
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
            check_weight_map(weight_map, {k: paths[e.file] for k, e in self._entries.items()})

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
        self._check_numel(key, out)
        return self._read_converted(key, out, 0)

    def read_rows_into(self, key: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        self._check_rows(key, out, start)
        return self._read_converted(key, out, start * math.prod(out.shape[1:]))

    def stored_dtype(self, key: str) -> torch.dtype | None:
        """The dtype the file stores the key in (None: one torch cannot hold)."""
        return self._entry(key).dtype

    def read_stored(self, key: str, out: np.ndarray, first: int = 0) -> None:
        """Entries `first : first + out.size` of the key, as stored (no conversion), into the
        C-contiguous `out` of the stored item size (bf16 as uint16 bits, say): what a kernel
        that reads the stored format itself needs, one positional read, no staging."""
        entry = self._entry(key)
        itemsize = SAFETENSORS_ITEMSIZE[entry.code]
        count = entry.nbytes // itemsize if itemsize else 0
        if out.itemsize != itemsize or not out.flags.c_contiguous or out.ndim != 1:
            raise MergeBenchError(
                f"{self.name}: tensor {key!r}: a {out.dtype} {list(out.shape)} buffer cannot "
                f"take its {entry.code} entries"
            )
        if not 0 <= first <= first + out.size <= count:
            raise MergeBenchError(
                f"{self.name}: tensor {key!r}: entries {first}:{first + out.size} are outside "
                f"its {count}"
            )
        if out.size == 0:
            return
        path = self._paths[entry.file]
        try:
            _pread_exact(
                self._files[entry.file], memoryview(out).cast("B"), entry.offset + first * itemsize
            )
        except OSError as err:
            raise MergeBenchError(f"{path}: cannot read tensor {key!r} ({err})") from None
        except EOFError:
            raise MergeBenchError(f"{path}: file ends inside tensor {key!r} (truncated?)") from None

    def _read_converted(self, key: str, out: torch.Tensor, first: int) -> torch.Tensor:
        """Entries `first : first + out.numel()` of the key into `out`, converted to its dtype.

        Same dtype: read straight into the caller's buffer. Another dtype (bf16 weights into
        the stream's float32 buffers): read in cache-sized chunks into one reused staging
        buffer per thread and convert each chunk while it is in the cache. A fresh tensor per
        key would cost a page fault and a zeroed page every 4 KiB, every key (measured:
        docs/performance.md), and a copy of the key's size in memory.
        """
        native = self.dtype(key)
        if out.is_contiguous() and out.device.type == "cpu":
            if out.dtype == native:
                self._read(key, out, skip=first * out.element_size())
                return out
            flat, itemsize = out.view(-1), native.itemsize
            per = max(1, _STAGING_BYTES // itemsize)
            staging = _staging(per * itemsize).view(native)
            for begin in range(0, flat.numel(), per):
                part = flat[begin : begin + per]
                chunk = staging[: part.numel()]
                self._read(key, chunk, skip=(first + begin) * itemsize)
                part.copy_(chunk)
            return out
        target = torch.empty(out.shape, dtype=native)  # a GPU or strided target: rare
        self._read(key, target, skip=first * target.element_size())
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
        if not isinstance(code, str) or code not in SAFETENSORS_ITEMSIZE:
            raise bad(f"tensor {key!r} has unknown dtype {code!r}")
        if code in UNMERGEABLE_CODES:
            raise unmergeable_dtype(str(path), key, code)
        dtype = SAFETENSORS_DTYPES.get(code)
        itemsize = SAFETENSORS_ITEMSIZE[code]
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

# Bytes read per chunk when converting: well inside a core's L2 cache with the converted
# chunk beside it, large enough that a read costs little more than its copy.
_STAGING_BYTES = 1 << 19
_staging_local = threading.local()


def _staging(nbytes: int) -> torch.Tensor:
    """This thread's staging buffer of at least `nbytes` bytes (allocated once)."""
    buffer = getattr(_staging_local, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        _staging_local.buffer = buffer
    return buffer[:nbytes]


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
