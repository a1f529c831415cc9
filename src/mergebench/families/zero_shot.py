"""Zero-shot heads of the CLIP-like families (`clip.py`, `openclip.py`): a task's classifier is
made from text prompts with the pretrained text tower, once, then cached on disk.

A head is keyed by what it is computed from: the pretrained weights (path, size and mtime of
each file), the class names and templates, and whatever else the family names
(`head_identity`, e.g. open_clip's architecture). Each family hashes the key as it always
did (`hash_head`), so heads cached before are still found.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergebench.data.hf import DataSpec
from mergebench.engine.checkpoints import TensorReader, open_checkpoint
from mergebench.families.clip_prompts import PROMPTS, PromptSet
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import atomic_save_safetensors
from mergebench.util.hashing import stable_hash
from mergebench.util.paths import cache_root as mergebench_cache

HEAD_FORMAT = 1


def prompt_set(spec: DataSpec) -> PromptSet:
    """The task's class names and templates: the configured ones, else its prompt set."""
    base = PROMPTS.get(spec.prompts or spec.task)
    if base is None and not (spec.classes and spec.templates):
        raise MergeBenchError(
            f"{spec.where}.prompts: no prompt set named {spec.prompts or spec.task!r} (known: "
            f"{', '.join(PROMPTS)}); or give this task classes and templates"
        )
    return PromptSet(
        classnames=spec.classes or base.classnames,
        templates=spec.templates or base.templates,
    )


def cache_root(head_cache: str | os.PathLike[str] | None) -> Path:
    """Where zero-shot heads are cached: the option, `$MERGEBENCH_CACHE/clip_heads`, or
    ~/.cache/mergebench/clip_heads."""
    if head_cache:
        return Path(head_cache).expanduser()
    return mergebench_cache() / "clip_heads"


def compact_hash(blob: Mapping[str, Any]) -> str:
    """The CLIP family's head key: `stable_hash` of the blob."""
    return stable_hash(blob)


def spaced_hash(blob: Mapping[str, Any]) -> str:
    """The open_clip family's head key: sha256 of `json.dumps(blob, sort_keys=True)`."""
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


class ZeroShotHeads:
    """The pretrained checkpoint and the cached zero-shot heads of a CLIP-like family.

    A family sets `pretrained_path`, `specs` and `head_cache` and implements
    `compute_zeroshot_weights(prompts)` (list this class before the family base, whose
    defaults it overrides); it may name more of a head's identity
    (`head_identity`) and how the key is hashed (`hash_head`)."""

    pretrained_path: Path
    specs: Mapping[str, DataSpec]
    head_cache: Path
    _source: TensorReader | None = None
    modality = "image"
    heads_separate = True  # heads come from the prompts: the checkpoints lack them
    hash_head = staticmethod(compact_hash)

    @classmethod
    def task_classes(cls, spec: DataSpec) -> tuple[str, ...]:
        return prompt_set(spec).classnames

    def pretrained_source(self) -> TensorReader:
        if self._source is None:
            self._source = open_checkpoint(self.pretrained_path, role="pretrained")
        return self._source

    def head_identity(self) -> dict[str, Any]:
        """What, besides the weights and prompts, a head is computed from."""
        return {}

    def _head_key(self, prompts: PromptSet) -> str:
        files = self.pretrained_source().files()
        identity = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        blob = {
            "format": HEAD_FORMAT,
            **self.head_identity(),
            "weights": identity or str(self.pretrained_path),
            "classnames": list(prompts.classnames),
            "templates": list(prompts.templates),
        }
        return self.hash_head(blob)[:32]

    def zeroshot_weights(self, task: str) -> torch.Tensor:
        """`[classes, embed_dim]`: logit_scale.exp() * the task's class embeddings."""
        from safetensors.torch import load_file

        prompts = prompt_set(self.specs[task])
        path = self.head_cache / f"{self._head_key(prompts)}.safetensors"
        if path.is_file():
            return load_file(str(path))["weight"]
        weight = self.compute_zeroshot_weights(prompts)
        atomic_save_safetensors(path, {"weight": weight.contiguous()}, {"task": task})
        return weight

    def compute_zeroshot_weights(self, prompts: PromptSet) -> torch.Tensor:
        raise NotImplementedError
