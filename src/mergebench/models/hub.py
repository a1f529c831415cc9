"""Checkpoints of the paper settings: a hub id or a local path, opened under the names of
the model that runs them.

`resolve_model(ref, option)` turns `openai/clip-vit-base-patch32` or `/data/ckpt` into a
local folder or file: an existing path is used as it is; anything else is a hub id,
downloaded once into the Hugging Face cache (weights as safetensors where the repository
has them). Offline, or without a network, the user gets one line naming the option and the
id, never a hub traceback.

`canonical_source(...)` presents a checkpoint under the key names of the family's model.
The same weights are saved under different names: a GPT-2 hub checkpoint is a bare
`GPT2Model` (`h.0.attn...`) while its classifier is `transformer.h.0.attn...`; transformers
5 saves a `CLIPVisionModel` without the `vision_model.` prefix that version 4 (and every
FusionBench checkpoint) has. Keys the model does not have (a language-model head, the text
tower of a full CLIP model, old buffers such as `position_ids`) are left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from mergebench.errors import MergeBenchError
from mergebench.tensors import CheckpointSource

# Only what loading a model needs: configs, tokenizer and processor files, weights.
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
_HUB_FILES_TORCH = ["*.json", "*.txt", "*.model", "pytorch_model*.bin"]


def hub_offline() -> bool:
    """Whether downloads from the hub are switched off (HF_HUB_OFFLINE, read at call time)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False


def _looks_like_path(ref: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else the user meant as a path."""
    return (
        ref.startswith(("/", ".", "~"))
        or ref.count("/") > 1
        or ref.endswith((".safetensors", ".bin", ".pt", ".pth", ".json"))
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_model(ref: object, option: str) -> Path:
    """A local folder or file for `ref` (a path, or a hub id fetched into the hub cache)."""
    if ref is None or str(ref).strip() == "":
        raise MergeBenchError(f"{option}: no checkpoint configured (a hub id or a local path)")
    text = str(ref).strip()
    path = Path(text).expanduser()
    if path.exists():
        return path
    if _looks_like_path(text):
        raise MergeBenchError(f"{option}: {text}: no such checkpoint file or folder")
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        folder = Path(snapshot_download(text, allow_patterns=_HUB_FILES, local_files_only=offline))
        if not any(folder.glob("*.safetensors")):  # an older repository: torch weights only
            folder = Path(
                snapshot_download(text, allow_patterns=_HUB_FILES_TORCH, local_files_only=offline)
            )
    except Exception as err:  # the hub raises many types; the user needs one line
        why = "the hub is switched off (HF_HUB_OFFLINE=1)" if offline else _first_line(err)
        raise MergeBenchError(
            f"{option}: cannot get {text!r} from the Hugging Face hub: {why}; it needs a "
            f"network (with HF_HUB_OFFLINE=0), or a local path: {option}=/path/to/checkpoint"
        ) from None
    return folder


def model_folder(path: Path) -> Path:
    """The folder holding a checkpoint's config and tokenizer files."""
    return path if path.is_dir() else path.parent


class CanonicalSource(CheckpointSource):
    """A checkpoint seen under the key names of a family's model, plus extra tensors that
    the family supplies (CLIP's zero-shot head). Read lazily, one key at a time."""

    def __init__(
        self,
        source: CheckpointSource,
        names: Mapping[str, str],
        extra: Mapping[str, torch.Tensor] | None = None,
        name: str | None = None,
    ) -> None:
        self.source = source
        self.name = name or source.name
        self._names = dict(names)  # our key -> the source's key
        self._extra = dict(extra or {})

    def keys(self) -> list[str]:
        return list(self._names) + list(self._extra)

    def __contains__(self, key: str) -> bool:
        return key in self._names or key in self._extra

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._extra:
            return tuple(self._extra[key].shape)
        return self.source.shape(self._source_key(key))

    def dtype(self, key: str) -> torch.dtype:
        if key in self._extra:
            return self._extra[key].dtype
        return self.source.dtype(self._source_key(key))

    def get(self, key: str) -> torch.Tensor:
        if key in self._extra:
            return self._extra[key]
        return self.source.get(self._source_key(key))

    def files(self) -> list[Path]:
        # A saved result refers to the pretrained file by path and reopens it with its own
        # key names: that only works when we did not rename or add anything.
        renamed = any(ours != theirs for ours, theirs in self._names.items())
        return [] if renamed or self._extra else self.source.files()

    def _source_key(self, key: str) -> str:
        try:
            return self._names[key]
        except KeyError:
            raise self._missing(key) from None


def canonical_source(
    source: CheckpointSource,
    wanted: Iterable[str],
    prefix: str,
    option: str,
    optional: Iterable[str] = (),
    extra: Mapping[str, torch.Tensor] | None = None,
) -> CanonicalSource:
    """`source` under the names in `wanted` (the model's keys): each found as it is, or
    without the model's base prefix (`prefix.`), or with one. `optional` keys may be absent
    (a task head in a pretrained checkpoint)."""
    have = set(source.keys())
    names: dict[str, str] = {}
    optional = set(optional)
    for key in wanted:
        candidates = [key]
        if key.startswith(prefix + "."):
            candidates.append(key[len(prefix) + 1 :])
        else:
            candidates.append(f"{prefix}.{key}")
        found = next((c for c in candidates if c in have), None)
        if found is not None:
            names[key] = found
        elif key not in optional:
            raise MergeBenchError(
                f"{option}: {source.name} lacks key {key!r} of the model (is it the right "
                "checkpoint for this model family?)"
            )
    return CanonicalSource(source, names, extra=extra)


__all__ = [
    "CanonicalSource",
    "canonical_source",
    "hub_offline",
    "model_folder",
    "resolve_model",
]
