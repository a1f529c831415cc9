"""The result artifact's format: its version, `result.json` (read and checked), the
manifest of the files written (digest and size) and the checksum of `result.json` itself,
and the checks a part's files must pass (shards of the right result, the right tasks).

Format versions: 1 wrote one file per part and no manifest; 2 added the manifest, the
checksum and task-specific keys `"<task index>::<key>"`; 3 writes each part as shards with
a Hugging Face index (`shards.py`); 4 records BLAKE3 digests (`util.hashing.DIGEST`) instead
of sha256 ones: each file's in the manifest, the pretrained tensors'. Every version still
loads (`loading.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.checkpoints import SafetensorsReader, TensorReader
from mergebench.results.shards import open_stem
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import TEMP_MARKER
from mergebench.util.hashing import (
    DIGEST,
    file_digest,
    format_digest,
    new_digest,
    remembered_digest,
)

FORMAT = "mergebench-result"
# 2: manifest + checksum, task-specific keys "<task index>::<key>"; 3: sharded parts + index;
# 4: the digests (manifest, pretrained tensors) are BLAKE3 (sha256 before)
FORMAT_VERSION = 4
SEP = "::"
META = "result.json"


def artifact_bytes(directory: str | Path) -> int:
    """Bytes of a saved result: the files its manifest lists (other files beside it, e.g.
    the user's notes, do not count), or every file of a folder without a manifest."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META).read_text())
        files = meta["manifest"]["files"]
        return (directory / META).stat().st_size + sum(int(f["size"]) for f in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def pretrained_digest(source: TensorReader, keys: list[str], algorithm: str = DIGEST) -> str:
    """The digest (`algorithm`, the format's by default) of the pretrained tensors a
    task-conditioned result adds its deltas to (key, dtype, shape and bytes, in key order):
    whatever file format they come in. Remembered between processes for safetensors files
    (`remembered_digest`), whose tensors are the files' bytes as stored."""
    if type(source) is SafetensorsReader:
        what: list[Any] = ["pretrained_digest", 1, sorted(keys)]
        if algorithm != "sha256":  # (sha256's entries are keyed as before BLAKE3 came)
            what.append(algorithm)
        return remembered_digest(source.files(), what,
                                 lambda: _tensors_digest(source, keys, algorithm))  # fmt: skip
    return _tensors_digest(source, keys, algorithm)


def _tensors_digest(source: TensorReader, keys: list[str], algorithm: str = DIGEST) -> str:
    digest = new_digest(algorithm)
    for key in sorted(keys):
        tensor = source.get(key).detach().to("cpu").contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def background_digest(source: TensorReader, keys: list[str]) -> Callable[[], str]:
    """Start `pretrained_digest(source, keys)` on a thread of its own (reads and hashing
    release the GIL) and return what waits for it: a streamed merge starts it with its
    workers instead of hashing the pretrained weights after them."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["digest"] = pretrained_digest(source, keys)
        except BaseException as err:  # handed to the caller, who raises it
            outcome["error"] = err

    thread = threading.Thread(target=run, name="mergebench-digest", daemon=True)
    thread.start()

    def result() -> str:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["digest"]

    return result


def meta_checksum(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def meta_text(meta: Mapping[str, Any]) -> str:
    try:
        return json.dumps(meta, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    except ValueError:
        raise MergeBenchError(
            "result: a parameter or rescaler is nan or inf; refusing to save it"
        ) from None


def check_rescalers(rescalers: Any, tasks: list[str], where: str) -> dict[str, float]:
    if not isinstance(rescalers, Mapping):
        raise MergeBenchError(f"{where}: rescalers missing or not a mapping {{task: number}}")
    if set(rescalers) != set(tasks):
        extra = sorted(set(rescalers) - set(tasks))
        missing = sorted(set(tasks) - set(rescalers))
        raise MergeBenchError(
            f"{where}: rescalers do not match the tasks (unknown: {extra}, missing: {missing})"
        )
    out: dict[str, float] = {}
    for task in tasks:
        value = rescalers[task]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeBenchError(f"{where}: rescaler of task {task!r} is {value!r}, not a number")
        if not math.isfinite(value):
            raise MergeBenchError(f"{where}: rescaler of task {task!r} is {value}, not finite")
        out[task] = float(value)
    return out


def read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise MergeBenchError(f"{meta_path}: not found (not a mergebench result folder)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise MergeBenchError(f"{meta_path}: invalid JSON ({err})") from None
    except OSError as err:
        raise MergeBenchError(f"{meta_path}: cannot read ({err.strerror or err})") from None
    if not isinstance(meta, dict):
        raise MergeBenchError(
            f"{meta_path}: not a mergebench result (a JSON {type(meta).__name__}, not an object)"
        )
    if meta.get("format") != FORMAT:
        raise MergeBenchError(
            f"{meta_path}: not a mergebench result (format={meta.get('format')!r})"
        )
    return meta


def read_tasks(meta: Mapping[str, Any], meta_path: Path) -> list[str]:
    tasks = meta.get("tasks")
    if (
        not isinstance(tasks, list)
        or not tasks
        or not all(isinstance(t, str) and t for t in tasks)
        or len(set(tasks)) != len(tasks)
    ):
        raise MergeBenchError(f"{meta_path}: 'tasks' must be a non-empty list of distinct names")
    if not isinstance(meta.get("method"), str):
        raise MergeBenchError(f"{meta_path}: 'method' missing")
    return list(tasks)


def check_manifest(directory: Path, meta: Mapping[str, Any], verify: bool) -> None:
    meta_path = directory / META
    try:
        expected = meta["checksum"]
        recorded = meta_checksum(meta)
    except KeyError:
        raise MergeBenchError(f"{meta_path}: checksum missing (edited by hand?)") from None
    except ValueError:
        raise MergeBenchError(f"{meta_path}: holds nan or inf (edited by hand?)") from None
    if expected != recorded:
        raise MergeBenchError(
            f"{meta_path}: content changed since the result was saved (checksum mismatch)"
        )
    files = (
        meta.get("manifest", {}).get("files") if isinstance(meta.get("manifest"), dict) else None
    )
    if not isinstance(files, dict):
        raise MergeBenchError(f"{meta_path}: manifest missing")
    for name, info in files.items():
        path = directory / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise MergeBenchError(f"{meta_path}: manifest names {name!r}, not a file name")
        if not isinstance(info, dict):
            raise MergeBenchError(f"{meta_path}: manifest entry {name!r} is not an object")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise MergeBenchError(f"{path}: missing from the result folder") from None
        if not path.is_file() or size != info.get("size"):
            raise MergeBenchError(
                f"{path}: changed since the result was saved ({size} bytes, "
                f"manifest says {info.get('size')})"
            )
        if verify:
            _check_digest(path, info, meta_path, name, meta.get("format_version", 1))


def _check_digest(
    path: Path, info: Mapping[str, Any], meta_path: Path, name: str, version: int
) -> None:
    """The file's digest against its manifest entry's, in the format's algorithm (BLAKE3,
    sha256 before format version 4): an entry of another algorithm is not taken."""
    algorithm = format_digest(version)
    if algorithm not in info:
        raise MergeBenchError(
            f"{meta_path}: manifest entry {name!r} records no {algorithm} digest "
            f"(format version {version})"
        )
    if file_digest(path, algorithm) != info[algorithm]:
        raise MergeBenchError(f"{path}: changed since the result was saved ({algorithm} mismatch)")


def open_part(directory: Path, stem: str, version: int = FORMAT_VERSION) -> SafetensorsReader:
    """A part of a result: its shards through the index, or (before format version 3,
    which introduced shards) its one file."""
    if version < 3:
        path = directory / f"{stem}.safetensors"
        if not path.is_file():
            raise MergeBenchError(f"{path}: missing from the result folder")
        return SafetensorsReader([path], f"result ({path})")
    return open_stem(directory, stem)


def check_recorded_tasks(source: SafetensorsReader, tasks: list[str]) -> None:
    """Every shard of a part records the tasks it was written for: they must be the
    result's (a part copied in from another result is refused)."""
    for shard in source.files():
        recorded = _safetensors_metadata_json(shard, "tasks")
        if recorded is not None and recorded != tasks:
            raise MergeBenchError(
                f"{shard}: written for tasks {recorded}, result.json says {tasks}"
            )


def _safetensors_metadata_json(path: Path, field_name: str) -> Any:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(field_name)
        return None if text is None else json.loads(text)
    except Exception as err:  # safetensors raises its own error types
        raise MergeBenchError(f"{path}: unreadable metadata ({err})") from None


def excluded_keys_of(source: SafetensorsReader) -> list[str]:
    path = source.files()[0]
    value = _safetensors_metadata_json(path, "pretrained_excluded")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise MergeBenchError(f"{path}: malformed 'pretrained_excluded' metadata")
    return value


def file_manifest(folder: Path, pool: ThreadPoolExecutor | None = None) -> dict[str, Any]:
    """Digest (`DIGEST`) and size of every file in `folder` but `result.json` (on
    `pool`'s threads)."""
    files = sorted(p.name for p in folder.iterdir() if p.name not in (META, TEMP_MARKER))
    hashes = (pool.map if pool else map)(lambda name: file_digest(folder / name), files)
    return {
        "files": {
            name: {DIGEST: digest, "size": (folder / name).stat().st_size}
            for name, digest in zip(files, hashes, strict=True)
        }
    }
