"""Reads an offline W&B run's `.wandb` file back (a LevelDB-style log of W&B protobuf
records), so tests can check what was logged without any server."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebench.util.errors import MergeBenchError

_HEADER = b":W&B"
_BLOCK = 32768
_RECORD_HEADER = 7  # crc32 (4) + length (2) + type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: str | os.PathLike[str]) -> list[Any]:
    """Every protobuf `Record` in a `.wandb` transaction log, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != _HEADER:
        raise MergeBenchError(f"{path}: not a W&B run file (bad header)")
    pos, pending, records = 7, b"", []
    while pos + _RECORD_HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _RECORD_HEADER:  # block tail too short: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        pos += _RECORD_HEADER
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST):  # zero padding: skip to the next block
            pos += (_BLOCK - pos % _BLOCK) % _BLOCK
            continue
        chunk, pos = data[pos : pos + length], pos + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@dataclass
class OfflineRun:
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    name: str | None = None
    complete: bool = False  # the run's exit record is in the file


def _item_key(item: Any) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def read_offline_run(run_dir: str | os.PathLike[str], timeout_s: float = 10.0) -> OfflineRun:
    """Config, history rows and summary of an offline run folder (`.../offline-run-*`).

    W&B's service process flushes the run file shortly after `run.finish()` returns, so this
    waits (up to `timeout_s`) for the run's exit record; after that it returns what is
    there, with `complete=False` (a crashed or still running run)."""
    import time

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise MergeBenchError(f"{run_dir}: no run-*.wandb file (not a W&B offline run folder)")
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(files[0])
        complete = any(r.WhichOneof("record_type") == "exit" for r in records)
        if complete or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    out = OfflineRun(complete=complete)
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.group = record.run.run_group or None
            out.name = record.run.display_name or None
            for item in record.run.config.update:
                out.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            out.history.append(
                {_item_key(i): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                out.summary[_item_key(item)] = json.loads(item.value_json)
    return out
