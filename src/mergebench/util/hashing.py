"""Stable hashes: of JSON-able data (configs, signatures) and of files."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys; non-JSON values as `str`)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Digests of files hashed while they were written (`remember_sha256`), by the file's
# identity and state: `sha256_file` takes one instead of reading the file again.
_known: dict[tuple[int, int, int, int], str] = {}
_known_lock = threading.Lock()


def _state(path: str | Path) -> tuple[int, int, int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def remember_sha256(path: str | Path, digest: str) -> None:
    """Record the sha256 of a file just written and closed (whose every byte its writer
    hashed): the next `sha256_file` of it, unchanged since, uses it once."""
    with _known_lock:
        _known[_state(path)] = digest


def forget_sha256(path: str | Path) -> None:
    """Drop a remembered digest of `path` (the file is about to be rewritten)."""
    try:
        state = _state(path)
    except OSError:
        return
    with _known_lock:
        _known.pop(state, None)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    with _known_lock:
        known = _known.pop(_state(path), None)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
