"""Checkpoints and models of the paper settings: a hub id or a local path.

`resolve_model(ref, option)` turns `openai/clip-vit-base-patch32` or `/data/ckpt` into a
local folder or file: an existing path is used as it is; anything else is a hub id,
downloaded once into the Hugging Face cache (weights as safetensors where the repository
has them). Offline, or without a network, the user gets one line naming the option and the
id, never a hub traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergebench.util.errors import MergeBenchError, first_line

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
        why = "the hub is switched off (HF_HUB_OFFLINE=1)" if offline else first_line(err)
        raise MergeBenchError(
            f"{option}: cannot get {text!r} from the Hugging Face hub: {why}; it needs a "
            f"network (with HF_HUB_OFFLINE=0), or a local path: {option}=/path/to/checkpoint"
        ) from None
    return folder


__all__ = ["hub_offline", "resolve_model"]
