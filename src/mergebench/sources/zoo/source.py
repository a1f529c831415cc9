"""The zoo as a checkpoint source: `ZooSource` reads a built zoo (building what is missing
first when `zoo.build_missing`), and `zoo_pool` opens its checkpoints as a `ModelPool`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergebench.engine.pool import ModelPool
from mergebench.families import embedded_family
from mergebench.families.base import HEAD, ZooFamily
from mergebench.families.labeled import LabeledData
from mergebench.sources.zoo.build import ensure_zoo
from mergebench.sources.zoo.manifest import family_dir, read_manifest
from mergebench.sources.zoo.references import ZooModels
from mergebench.util.config import to_plain as _plain
from mergebench.util.errors import MergeBenchError
from mergebench.util.hashing import stable_hash


def zoo_pool(
    cfg_model: Mapping[str, Any],
    cfg_taskset: Mapping[str, Any],
    zoo_dir: str | Path,
    family: ZooFamily,
    data: LabeledData,
) -> ModelPool:
    """The pool over the zoo's checkpoints of an already loaded family."""
    zoo_dir = Path(zoo_dir)
    paths = [zoo_dir / "pretrained.safetensors"] + [
        zoo_dir / f"{t}.safetensors" for t in data.tasks
    ]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MergeBenchError(
            f"{missing[0]}: zoo checkpoint missing (build it with mergebench-zoo)"
        )
    return ModelPool.from_checkpoints(
        zoo_dir / "pretrained.safetensors",
        {t: zoo_dir / f"{t}.safetensors" for t in data.tasks},
        exclude=list(cfg_model.get("exclude") or [rf"{HEAD}\..*"]),
        family=family,
        name=f"{cfg_model['name']}/{cfg_taskset.get('name', 'custom')}",
        layer_pattern=cfg_model.get("layer_pattern"),
    )


class ZooSource:
    """A `CheckpointSource` over the offline zoo, built (or refreshed) first when allowed."""

    def __init__(self, cfg: Mapping[str, Any], progress: bool = True) -> None:
        self.cfg_model, self.cfg_taskset = _plain(cfg["model"]), _plain(cfg["taskset"])
        self.taskset = str(self.cfg_taskset["name"])
        seed = int(cfg.get("seed", 0))
        zoo = _plain(cfg.get("zoo")) or {}
        self.directory = family_dir(cfg)
        if zoo.get("build_missing", True):
            ensure_zoo(cfg, progress=progress)
        self.family, self.data = embedded_family(self.cfg_model, self.cfg_taskset, seed)
        self.manifest = read_manifest(self.directory)
        missing = [t for t in self.data.tasks if t not in self.manifest["tasks"]]
        if missing:
            raise MergeBenchError(
                f"zoo.dir: no fine-tuned {missing[0]!r} in {self.directory} "
                "(run mergebench-zoo, or set zoo.build_missing=true)"
            )

    def signature(self) -> str:
        tasks = self.manifest["tasks"]
        return stable_hash(
            {
                "tasks": {t: tasks[t]["signature"] for t in self.data.tasks},
                "multitask": self.manifest["multitask"].get(self.taskset, {}).get("signature"),
            }
        )

    def cache_dir(self) -> Path:
        return self.directory

    def pool(self) -> ModelPool:
        return zoo_pool(self.cfg_model, self.cfg_taskset, self.directory, self.family, self.data)

    def reference_kinds(self) -> tuple[str, ...]:
        if self.taskset in self.manifest["multitask"]:
            return ("individual", "multitask", "pretrained")
        return ("individual", "pretrained")

    def reference(self, kind: str) -> ZooModels:
        return ZooModels(kind, self.directory, self.data.tasks, self.taskset)
