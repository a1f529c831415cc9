"""Torch `.pt/.bin` state dicts, loaded with `weights_only=True` (never unpickling objects),
memory-mapped when possible; files that are not torch checkpoints are said for what they are."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from mergebench.engine.reader import (
    StateDictReader,
    check_weight_map,
    require_regular_file,
)
from mergebench.util.errors import MergeBenchError, first_line


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
    require_regular_file(path)
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
        raise MergeBenchError(f"{path}: not a readable torch file ({first_line(err)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError) as err:
        raise MergeBenchError(
            f"{path}: cannot load as a torch state dict with weights_only=True ({first_line(err)})"
        ) from None
    for wrapper in ("state_dict", "model"):  # Lightning, many scripts; unilm's {"model": ...}
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MergeBenchError(f"{path}: expected a state dict of tensors")
    return dict(obj)


class TorchFileReader(StateDictReader):
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
            check_weight_map(weight_map, owner)
        super().__init__(state, name=name)
        self._paths = paths

    def files(self) -> list[Path]:
        return list(self._paths)
