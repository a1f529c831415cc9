"""What a family's zoo folder holds and how it is keyed: its location, the checkpoint
signatures, `zoo.json`, and checkpoints written so that a crash never leaves half of one."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergebench.families.labeled import LabeledData
from mergebench.sources.zoo.settings import multitask_settings, single_task_settings
from mergebench.util.config import to_plain as _plain
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import atomic_save_safetensors, atomic_write_text
from mergebench.util.hashing import stable_hash
from mergebench.util.paths import cache_root

ZOO_FORMAT = 2  # bump when training changes: old checkpoints are retrained


def zoo_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where zoos live: the argument, else `$MERGEBENCH_CACHE/zoo`, else ~/.cache/mergebench/zoo."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return cache_root() / "zoo"


def family_dir(cfg: Mapping[str, Any]) -> Path:
    """The family's zoo folder: `<zoo dir>/<family>` for seed 0, `<family>-seed<n>` for any
    other seed, so the zoos of a multi-seed sweep live side by side instead of retraining
    each other's checkpoints."""
    seed = int(cfg.get("seed", 0) or 0)
    name = str(cfg["model"]["name"]) + (f"-seed{seed}" if seed else "")
    return zoo_root((cfg.get("zoo") or {}).get("dir")) / name


def task_signature(
    cfg_model: Mapping[str, Any], hp: Mapping[str, Any], seed: int, task: str, fingerprint: str
) -> str:
    return stable_hash(
        {
            "format": ZOO_FORMAT,
            "family": cfg_model["name"],
            "options": _plain(cfg_model.get("options")) or {},
            "finetune": single_task_settings(hp),
            "seed": seed,
            "task": task,
            "data": fingerprint,
        }
    )


def multitask_signature(
    cfg_model: Mapping[str, Any], hp: Mapping[str, Any], seed: int, data: LabeledData
) -> str:
    return stable_hash(
        {
            "tasks": {
                t: task_signature(cfg_model, hp, seed, t, data.fingerprint(t)) for t in data.tasks
            },
            "multitask": multitask_settings(hp),
        }
    )


def save_atomic(
    tensors: Mapping[str, torch.Tensor], path: Path, meta: Mapping[str, str] | None = None
) -> None:
    """safetensors via a temporary file and a rename: a crash never leaves half a checkpoint.
    Cloned: safetensors refuses tensors that share storage (tied weights)."""
    plain = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_save_safetensors(path, plain, meta)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / "zoo.json"
    if not path.exists():
        return {"format": ZOO_FORMAT, "tasks": {}, "multitask": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MergeBenchError(f"{path}: not valid JSON ({err.msg}); delete it to rebuild") from err
    data.setdefault("tasks", {})
    data.setdefault("multitask", {})
    return data


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write_text(directory / "zoo.json", json.dumps(manifest, indent=2, sort_keys=True))
