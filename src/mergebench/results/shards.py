"""Sharded safetensors written tensor by tensor, and read back lazily.

A merge knows every output tensor's key, shape and dtype before it computes any of them
(they are the pretrained model's). `ShardedWriter` therefore lays the shards out up front:
it assigns keys to shards in order, writes each shard's safetensors header, sizes the file,
and then each finished tensor is written at its offset with `pwrite` (any thread, any
order). Nothing but the tensor being written is held in memory, whatever the model's depth.
While the tensors come in, the writing threads hash each shard's part written from the start
on (`_PrefixDigest`), mostly from their own buffers, so the manifest's digest of a shard
written roughly in order costs no pass of its own after the merge.

Files of a stem `model`: `model.safetensors` when one shard holds everything, otherwise
`model-00001-of-00003.safetensors`, ...; always `model.safetensors.index.json` in the
Hugging Face layout (`{"metadata": {"total_size": ...}, "weight_map": {key: file}}`), so a
result's shards open with `transformers`/`safetensors` tooling as well as with ours.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mergebench.engine.checkpoints import SafetensorsReader, TensorReader, shards_from_index
from mergebench.util.errors import MergeBenchError
from mergebench.util.hashing import forget_file_digests, new_digest, remember_file_digest

# Shards of at most this many bytes unless told otherwise (Hugging Face's default is 5 GB).
DEFAULT_SHARD_BYTES = 4 * 10**9

_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(value: int | str, option: str = "shard_size") -> int:
    """Bytes from `123`, `"500MB"`, `"2GiB"` (decimal and binary units, case-insensitive)."""
    if isinstance(value, bool):
        raise MergeBenchError(f"{option}: {value!r} is not a size (use e.g. 2GB or 500MiB)")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise MergeBenchError(f"{option}: {value!r} is not a size (use e.g. 2GB or 500MiB)")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise MergeBenchError(f"{option}: {value!r} must be a positive size")
    return size


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_file_names(stem: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def index_name(stem: str) -> str:
    return f"{stem}.safetensors.index.json"


class ShardedWriter:
    """Writes the tensors `entries` into `folder/<stem>*.safetensors`, one call per tensor.

    `write` may be called from several threads and in any order; `close` checks that every
    entry was written and writes the index. Files are sized when the writer opens, so a
    partly written artifact is never mistaken for a whole one: only `close` makes the
    index, and the result's manifest comes after that.
    """

    def __init__(
        self,
        folder: Path,
        stem: str,
        entries: Sequence[Entry],
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.stem = stem
        self._entries = {e.key: e for e in entries}
        if len(self._entries) != len(entries):
            raise MergeBenchError(f"{stem}: the same key twice in one artifact")
        groups = _group(entries, shard_bytes)
        self.files = shard_file_names(stem, len(groups))
        self._where: dict[str, tuple[int, int]] = {}  # key -> (shard, absolute offset)
        self._fds: list[int] = []
        self._written: set[str] = set()
        self._bytes: dict[str, int] = {}  # bytes written per key (row blocks add up)
        self._lock = threading.Lock()
        self._digests: list[_PrefixDigest] = []
        # One pwrite at a time per file: concurrent buffered writes into one file wait on
        # its inode lock in the kernel by spinning (2 threads: twice the system time).
        self._file_locks: list[threading.Lock] = []
        try:
            for shard, group in enumerate(groups):
                header, data_start = _header(group, metadata)
                forget_file_digests(self.folder / self.files[shard])  # about to be rewritten
                fd = os.open(
                    self.folder / self.files[shard], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644
                )
                self._fds.append(fd)
                self._file_locks.append(threading.Lock())
                _pwrite_all(fd, memoryview(header), 0)
                offset = data_start
                for entry in group:
                    self._where[entry.key] = (shard, offset)
                    offset += entry.nbytes
                os.ftruncate(fd, offset)
                self._digests.append(_PrefixDigest(fd, offset))
                self._digests[-1].written(0, header)
        except BaseException:
            self._close_fds()
            raise

    def write(self, key: str, tensor: torch.Tensor) -> None:
        entry = self._entry(key)
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise MergeBenchError(
                f"{self.stem}: {key!r} is {tensor.dtype} {list(tensor.shape)}, the artifact "
                f"laid out {entry.dtype} {list(entry.shape)}"
            )
        shard, offset = self._where[key]
        self._pwrite(shard, tensor, offset)
        self._done(key, entry.nbytes)

    def write_rows(self, key: str, tensor: torch.Tensor, start: int) -> None:
        """Rows `start : start + len(tensor)` of tensor `key` (a row block of a merge that
        cuts big keys): the key counts as written once all its bytes are."""
        entry = self._entry(key)
        self._check_part(key, entry, tensor, start, dim=0)
        shard, offset = self._where[key]
        self._pwrite(shard, tensor, offset + start * (entry.nbytes // entry.shape[0]))
        self._done(key, tensor.numel() * tensor.element_size())

    def write_span(self, key: str, tensor: torch.Tensor, first: int) -> None:
        """Entries `first : first + tensor.numel()` (flat, row-major) of tensor `key`: a
        merge that goes entry by entry may cut a key anywhere."""
        entry = self._entry(key)
        if tensor.dtype != entry.dtype or not 0 <= first <= first + tensor.numel() <= (
            entry.nbytes // tensor.element_size()
        ):
            raise MergeBenchError(
                f"{self.stem}: {key!r} entries {tensor.dtype} {first}:{first + tensor.numel()} "
                f"do not fit the artifact's {entry.dtype} {list(entry.shape)}"
            )
        shard, offset = self._where[key]
        self._pwrite(shard, tensor, offset + first * tensor.element_size())
        self._done(key, tensor.numel() * tensor.element_size())

    def write_columns(self, key: str, tensor: torch.Tensor, start: int) -> None:
        """Columns `start : start + tensor.shape[1]` of the 2-D tensor `key` (the packed masks
        of one row block, `[N, bytes]`): one positional write per row."""
        entry = self._entry(key)
        self._check_part(key, entry, tensor, start, dim=1)
        shard, offset = self._where[key]
        row_bytes = entry.nbytes // entry.shape[0]
        rows = _byte_rows(tensor)  # one conversion, then numpy slices (torch's cost 10x)
        for index in range(rows.shape[0]):
            self._pwrite_bytes(shard, rows[index], offset + index * row_bytes
                               + start * tensor.element_size())  # fmt: skip
        self._done(key, tensor.numel() * tensor.element_size())

    def _entry(self, key: str) -> Entry:
        entry = self._entries.get(key)
        if entry is None:
            raise MergeBenchError(f"{self.stem}: {key!r} is not a tensor of this artifact")
        return entry

    def _check_part(
        self, key: str, entry: Entry, tensor: torch.Tensor, start: int, dim: int
    ) -> None:
        shape = list(entry.shape)
        fits = (
            tensor.dtype == entry.dtype
            and tensor.dim() == len(shape) > dim
            and all(tensor.shape[i] == shape[i] for i in range(len(shape)) if i != dim)
            and start >= 0
            and start + tensor.shape[dim] <= shape[dim]
        )
        if not fits:
            raise MergeBenchError(
                f"{self.stem}: {key!r} part {tensor.dtype} {list(tensor.shape)} at {start} (dim "
                f"{dim}) does not fit the artifact's {entry.dtype} {shape}"
            )

    def _pwrite(self, shard: int, tensor: torch.Tensor, offset: int) -> None:
        self._pwrite_bytes(shard, _byte_rows(tensor.reshape(1, -1))[0], offset)

    def _pwrite_bytes(self, shard: int, data: np.ndarray, offset: int) -> None:
        if data.size:
            with self._file_locks[shard]:
                _pwrite_all(self._fds[shard], memoryview(data), offset)
            self._digests[shard].written(offset, data)

    def _done(self, key: str, nbytes: int) -> None:
        with self._lock:
            self._bytes[key] = self._bytes.get(key, 0) + nbytes
            if self._bytes[key] >= self._entries[key].nbytes:
                self._written.add(key)

    def close(self) -> list[str]:
        """Check every tensor was written, close the shards, write the index; the file
        names written, index last."""
        missing = [k for k in self._entries if k not in self._written]
        digests = [d.finish() for d in self._digests] if not missing else []
        self._close_fds()
        for name, digest in zip(self.files, digests, strict=False):
            if digest is not None:
                remember_file_digest(self.folder / name, digest)
        if missing:
            raise MergeBenchError(
                f"{self.stem}: {len(missing)} tensors never written ({missing[0]!r}, ...)"
            )
        weight_map = {key: self.files[shard] for key, (shard, _) in self._where.items()}
        total = sum(e.nbytes for e in self._entries.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / index_name(self.stem)).write_text(json.dumps(index, indent=1) + "\n")
        return [*self.files, index_name(self.stem)]

    def abort(self) -> None:
        self._close_fds()

    def _close_fds(self) -> None:
        for digest in self._digests:
            digest.stop()
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


@contextmanager
def writing(*writers: ShardedWriter | None) -> Iterator[None]:
    """The given writers (None: absent) closed when the block ends, all aborted if it
    raises (or a close does): each `ShardedWriter`'s own context, entered together."""
    with ExitStack() as stack:
        for writer in writers:
            if writer is not None:
                stack.enter_context(writer)
        yield


def write_tensors(
    folder: Path,
    stem: str,
    entries: Sequence[Entry],
    get: Callable[[str], torch.Tensor],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write `get(key)` for every entry, one tensor in memory at a time."""
    with ShardedWriter(folder, stem, entries, shard_bytes, metadata) as writer:
        for entry in entries:
            writer.write(entry.key, get(entry.key))
    return writer.files


def entries_of(
    tensors: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None
) -> list[Entry]:
    """Entries of a mapping, without reading a lazy one."""
    shape = getattr(tensors, "shape", None)
    dtype = getattr(tensors, "dtype", None)
    out = []
    for key in tensors if keys is None else keys:
        if callable(shape) and callable(dtype):  # LazyTensors
            out.append(Entry(key, tuple(shape(key)), dtype(key)))
        else:
            tensor = tensors[key]
            out.append(Entry(key, tuple(tensor.shape), tensor.dtype))
    return out


def open_stem(folder: Path, stem: str, role: str = "result") -> SafetensorsReader:
    """The shards of `stem` in `folder` (through its index), or the single file of an
    artifact written before shards existed."""
    index = folder / index_name(stem)
    if index.is_file():
        shards, where = shards_from_index(index)
        if shards:  # an empty part has one tensor-less file, which its index cannot name
            return SafetensorsReader(shards, f"{role} ({index})", weight_map=where)
    single = folder / f"{stem}.safetensors"
    if not single.is_file():
        raise MergeBenchError(f"{single}: missing from the result folder")
    return SafetensorsReader([single], f"{role} ({single})")


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping whose tensors are read from the files on each access: a loaded
    result holds file handles, not a model's worth of memory."""

    def __init__(self, source: TensorReader, keys: Iterable[str] | None = None) -> None:
        self.source = source
        self._keys = list(source.keys()) if keys is None else list(keys)
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self.source.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.source.shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return self.source.dtype(key)

    def files(self) -> list[Path]:
        return self.source.files()

    def __repr__(self) -> str:
        return f"LazyTensors({len(self._keys)} tensors from {self.source.name})"


def shape_of(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if isinstance(tensors, LazyTensors):
        return tensors.shape(key)
    return tuple(tensors[key].shape)


def dtype_of(tensors: Mapping[str, torch.Tensor], key: str) -> torch.dtype:
    if isinstance(tensors, LazyTensors):
        return tensors.dtype(key)
    return tensors[key].dtype


# --- layout ---------------------------------------------------------------------------------
def _group(entries: Sequence[Entry], shard_bytes: int) -> list[list[Entry]]:
    """Keys in order into shards of at most `shard_bytes` (a bigger tensor gets its own)."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


def _header(group: Sequence[Entry], metadata: Mapping[str, str] | None) -> tuple[bytes, int]:
    """The safetensors header (length prefix, JSON padded to 8 bytes) and where data starts."""
    body: dict[str, object] = {}
    if metadata:
        body["__metadata__"] = dict(metadata)
    offset = 0
    for entry in group:
        code = _DTYPE_CODES.get(entry.dtype)
        if code is None:
            raise MergeBenchError(
                f"{entry.key!r}: dtype {entry.dtype} cannot be saved as safetensors"
            )
        body[entry.key] = {"dtype": code, "shape": list(entry.shape),
                           "data_offsets": [offset, offset + entry.nbytes]}  # fmt: skip
        offset += entry.nbytes
    text = json.dumps(body, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, 8 + len(text)


class _PrefixDigest:
    """The digest (`DIGEST`) of a file of `size` bytes being written in pieces, hashed by
    the writing threads as the written prefix grows: a piece that extends the prefix is
    hashed from the writer's memory (still in its cache) right after its `pwrite`; one that
    lands past the prefix is kept as a copy (up to `_KEEP_BYTES` per file) or, past that, as
    a range to read back from the file once the prefix reaches it. A piece inside the part
    already covered (a rewrite) spoils the digest (`finish` gives None: the file is hashed
    again, as without this). No thread of its own: a hand-off per piece cost more than the
    hash."""

    _KEEP_BYTES = 64 << 20
    _CHUNK = 1 << 23  # read-back reads

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._size = fd, size
        self._pending: dict[int, bytes | int] = {}  # start -> a copy, or the end to read back
        self._kept = 0  # bytes held in copies
        self._prefix = 0  # bytes [0, prefix) hashed, or being hashed by the busy thread
        self._busy = self._spoiled = False
        self._buffer: memoryview | None = None  # read-backs' (the busy thread's alone)
        self._lock = threading.Lock()
        self._digest = new_digest()

    def written(self, start: int, data: np.ndarray | bytes) -> None:
        """Bytes `data` were just written at `start` (a C-contiguous uint8 array or bytes)."""
        end = start + len(data)
        with self._lock:
            if self._spoiled:
                return
            if start < self._prefix or start in self._pending:
                self._spoil()
                return
            if start > self._prefix or self._busy:
                if self._kept + len(data) <= self._KEEP_BYTES:
                    self._pending[start] = bytes(data)
                    self._kept += len(data)
                else:
                    self._pending[start] = end
                return
            self._busy = True
            self._prefix = end
        self._hash_from(memoryview(data))

    def _hash_from(self, data: memoryview) -> None:
        """Hash `data` (the bytes at the prefix) and then every kept piece or range the
        prefix reaches, until none is next; this thread alone hashes meanwhile (`_busy`)."""
        try:
            while True:
                self._digest.update(data)
                with self._lock:
                    piece = self._pending.pop(self._prefix, None)
                    if piece is None or self._spoiled:
                        self._busy = False
                        return
                    start = self._prefix
                    if isinstance(piece, int):  # with the ranges right after it: one read-back
                        while isinstance(self._pending.get(piece), int):
                            piece = self._pending.pop(piece)
                        self._prefix = piece
                    else:
                        self._kept -= len(piece)
                        self._prefix += len(piece)
                if isinstance(piece, int):
                    self._hash_read_back(start, piece)
                    data = memoryview(b"")
                else:
                    data = memoryview(piece)
        except (OSError, EOFError):  # (the file's own hash at the end says what is wrong)
            with self._lock:
                self._busy = False
                self._spoil()

    def _hash_read_back(self, start: int, end: int) -> None:
        """Hash bytes `start : end` read back from the file, `_CHUNK` at a time."""
        if self._buffer is None:
            self._buffer = memoryview(bytearray(min(self._CHUNK, self._size)))
        buffer = self._buffer
        while start < end:
            count = os.preadv(self._fd, [buffer[: min(len(buffer), end - start)]], start)
            if not count:
                raise EOFError
            self._digest.update(buffer[:count])
            start += count

    def finish(self) -> str | None:
        """The file's digest once every byte is written and hashed, else None."""
        with self._lock:
            # (a piece left pending overlapped another: the bytes hashed may be stale)
            unsure = self._busy or self._spoiled or self._pending
            whole = self._prefix == self._size and not unsure
            return self._digest.hexdigest() if whole else None

    def stop(self) -> None:
        """Drop what is kept (the writer is aborting)."""
        with self._lock:
            self._spoil()

    def _spoil(self) -> None:  # (under the lock)
        self._spoiled = True
        self._pending.clear()
        self._kept = 0


def _byte_rows(tensor: torch.Tensor) -> np.ndarray:
    """The rows of a 2-D tensor as a C-contiguous `[rows, bytes]` uint8 array (on the CPU;
    a view of its memory when it is there already)."""
    data = tensor.detach().to("cpu").contiguous()
    flat = data.reshape(-1).view(torch.uint8).numpy()
    rows = data.shape[0]
    return flat.reshape(rows, flat.size // rows if rows else 0)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B")
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written
