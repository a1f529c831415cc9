"""Stable hashes: of JSON-able data (configs, signatures) and of files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import blake3

from mergebench.util.paths import cache_root


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys; non-JSON values as `str`)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# The result format's digest (version 4 on) of every file a result writes (its manifest) and
# of the pretrained tensors a task-conditioned result applies to: BLAKE3, several times
# sha256's speed on one core and parallel over more (docs/performance.md, "The manifest's
# digest"). Results of older formats record sha256, still checked as such.
DIGEST = "blake3"
DIGESTS = ("blake3", "sha256")  # what a result may record, newest first


def new_digest(algorithm: str = DIGEST, every_core: bool = False) -> Any:
    """An empty hashlib-style digest (`update`, `hexdigest`) of `algorithm`; BLAKE3 hashes
    large updates on every core with `every_core`."""
    if algorithm == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO if every_core else 1)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest {algorithm!r} (known: {', '.join(DIGESTS)})")


def format_digest(format_version: int) -> str:
    """The digest a result of `format_version` records: sha256 before version 4."""
    return DIGEST if format_version >= 4 else "sha256"


# Digests of files hashed while they were written (`remember_file_digest`), by the file's
# identity and state and the algorithm: `file_digest` takes one instead of reading the file.
_known: dict[tuple[tuple[int, int, int, int], str], str] = {}
_known_lock = threading.Lock()


def _state(path: str | Path) -> tuple[int, int, int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def remember_file_digest(path: str | Path, digest: str, algorithm: str = DIGEST) -> None:
    """Record the digest of a file just written and closed (whose every byte its writer
    hashed): the next `file_digest` of it, unchanged since, uses it once."""
    with _known_lock:
        _known[(_state(path), algorithm)] = digest


def forget_file_digests(path: str | Path) -> None:
    """Drop every remembered digest of `path` (the file is about to be rewritten)."""
    try:
        state = _state(path)
    except OSError:
        return
    with _known_lock:
        for algorithm in DIGESTS:
            _known.pop((state, algorithm), None)


def file_digest(path: str | Path, algorithm: str = DIGEST, chunk: int = 1 << 22) -> str:
    """The hex digest of the file at `path` (`algorithm`: one of `DIGESTS`); BLAKE3
    on every core (a check on load is the user's wait)."""
    with _known_lock:
        known = _known.pop((_state(path), algorithm), None)
    if known is not None:
        return known
    digest = new_digest(algorithm, every_core=True)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of the file at `path` (data files, results saved before format version 4)."""
    return file_digest(path, "sha256", chunk)


# Digests kept between processes (`remembered_digest`): a task-conditioned merge and every
# load of its result hash the pretrained weights (0.3 s of sha256 for ViT-B/32, about 10 s
# for a 7B model) though the files have not changed since the last time.
_DIGESTS = "digests"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
# Files changed this recently are not remembered: a file system whose clock is coarser
# could hide a write made right after the hash behind the same timestamps.
RACY_NS = 2_000_000_000


def _file_states(files: Sequence[Path]) -> list[list[Any]]:
    states = []
    for path in files:
        stat = os.stat(path)
        states.append([os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size,
                       stat.st_mtime_ns, stat.st_ctime_ns])  # fmt: skip
    return states


def remembered_digest(files: Sequence[Path], what: Any, compute: Callable[[], str]) -> str:
    """`compute()`, a 256-bit hex digest of `what` read from `files`, remembered in
    `<cache>/digests/` while every file keeps its device, inode, size, mtime and ctime (any
    write changes the ctime, and no call can set it back). Not remembered: files changed in
    the last `RACY_NS`, or while `compute` ran. A cache that cannot be read or written
    costs the recomputation only."""
    if not files:
        return compute()
    try:
        before = _file_states(files)
    except OSError:
        return compute()
    entry = cache_root() / _DIGESTS / stable_hash([what, before])
    try:
        known = entry.read_text().strip()
    except (OSError, UnicodeDecodeError):
        known = ""
    if _HEX_DIGEST.fullmatch(known):
        return known
    digest = compute()
    now = time.time_ns()
    try:
        settled = all(now - max(state[4], state[5]) > RACY_NS for state in before)
        if settled and _file_states(files) == before and _HEX_DIGEST.fullmatch(digest):
            entry.parent.mkdir(parents=True, exist_ok=True)
            temporary = entry.with_name(f"{entry.name}.{os.getpid()}.{threading.get_ident()}")
            temporary.write_text(digest + "\n")
            os.replace(temporary, entry)
    except OSError:
        pass
    return digest
