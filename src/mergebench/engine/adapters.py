"""PEFT adapters as checkpoint readers, so that every merging method sees task vectors.

(IA)3 learns scaling vectors `l`, initialised to ones: its task vector is `tau = l - 1`.
`IdentitySource` is the pretrained side of such a pool (an all-ones tensor per adapter key,
made on request), and the adapter file itself is each task's side; a method computing
`finetuned - pretrained` then gets `l - 1`, and a merged `1 + tau` is the merged vector.

LoRA learns `B @ A` beside a frozen weight `W`: its task vector is the weight delta
`B @ A * scale` (scale `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA). The pool is
over the target modules' weights: `base_weights` gives `W` (the pretrained side) and
`LoRADeltaSource` gives `W + B @ A * scale`, computed per key when asked, so nothing is
materialised beyond the tensor being merged.

These readers know the adapter file's key names (`<prefix>.<module>.ia3_l`,
`<prefix>.<module>.lora_A.weight`) and the adapter config's numbers, not peft itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.checkpoints import TensorReader
from mergebench.engine.renamed import CanonicalSource
from mergebench.util.errors import MergeBenchError

PEFT_PREFIX = "base_model.model."  # what peft's save_pretrained puts before module names


class IdentitySource(TensorReader):
    """All-ones tensors with the keys, shapes and dtypes of `like` ((IA)3's initialisation)."""

    def __init__(self, like: TensorReader, name: str = "identity (all-ones adapter)") -> None:
        self.name = name
        self._shapes = {k: tuple(like.shape(k)) for k in like.keys()}
        self._dtypes = {k: like.dtype(k) for k in like.keys()}

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._shapes:
            raise self._missing(key)
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        if key not in self._dtypes:
            raise self._missing(key)
        return self._dtypes[key]

    def get(self, key: str) -> torch.Tensor:
        return torch.ones(self.shape(key), dtype=self.dtype(key))


def lora_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """peft's scaling of one LoRA module: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA;
    `alpha_pattern` overrides alpha for modules whose name ends with a pattern."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            alpha = float(value)
            break
    if rank < 1:
        raise MergeBenchError(f"LoRA module {module!r}: rank {rank} < 1")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


@dataclass(frozen=True)
class LoRAModule:
    """One target module of a LoRA adapter: its weight key in the base model, its two
    factors' keys in the adapter file."""

    weight: str  # e.g. encoder.block.0.layer.0.SelfAttention.q.weight
    lora_a: str  # base_model.model.<module>.lora_A.weight
    lora_b: str


def lora_modules(adapter: TensorReader, prefix: str = PEFT_PREFIX) -> list[LoRAModule]:
    """The target modules of a LoRA adapter file, in file order."""
    modules = []
    keys = set(adapter.keys())
    for key in adapter.keys():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b_key = module + ".lora_B.weight"
        if b_key not in keys:
            raise MergeBenchError(f"{adapter.name}: {key!r} has no matching {b_key!r}")
        name = module[len(prefix) :] if module.startswith(prefix) else module
        modules.append(LoRAModule(name + ".weight", key, b_key))
    if not modules:
        raise MergeBenchError(f"{adapter.name}: no LoRA factors (keys '*.lora_A.weight')")
    return modules


def lora_delta(
    a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """`B @ A * scale` in float32 (transposed for Conv1D-style `fan_in_fan_out` weights)."""
    delta = (b.to(torch.float32) @ a.to(torch.float32)) * scale
    return delta.T if fan_in_fan_out else delta


class LoRADeltaSource(TensorReader):
    """The base model's target weights with one LoRA adapter applied: `W + B @ A * scale`
    per key, computed when the key is read (in the base weight's dtype)."""

    def __init__(
        self,
        base: TensorReader,
        adapter: TensorReader,
        config: Mapping[str, Any],
        modules: Iterable[LoRAModule],
        name: str | None = None,
    ) -> None:
        self.base = base
        self.adapter = adapter
        self.config = dict(config)
        self.name = name or adapter.name
        self._modules = {m.weight: m for m in modules}
        for m in self._modules.values():
            for key in (m.lora_a, m.lora_b):
                if key not in adapter:
                    raise MergeBenchError(f"{self.name}: lacks LoRA factor {key!r}")
            if m.weight not in base:
                raise MergeBenchError(
                    f"{self.name}: target weight {m.weight!r} is not in the base model {base.name}"
                )

    def keys(self) -> list[str]:
        return list(self._modules)

    def __contains__(self, key: str) -> bool:
        return key in self._modules

    def _module(self, key: str) -> LoRAModule:
        if key not in self._modules:
            raise self._missing(key)
        return self._modules[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(self._module(key).weight)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(self._module(key).weight)

    def delta(self, key: str) -> torch.Tensor:
        """`B @ A * scale` of one target weight (float32)."""
        m = self._module(key)
        a = self.adapter.get(m.lora_a)
        module = key[: -len(".weight")]
        scale = lora_scale(self.config, module, int(a.shape[0]))
        delta = lora_delta(
            a, self.adapter.get(m.lora_b), scale, bool(self.config.get("fan_in_fan_out"))
        )
        if tuple(delta.shape) != tuple(self.shape(key)):
            raise MergeBenchError(
                f"{self.name}: LoRA delta of {key!r} has shape {list(delta.shape)}, the base "
                f"weight {list(self.shape(key))}"
            )
        return delta

    def get(self, key: str) -> torch.Tensor:
        weight = self.base.get(key)
        return (weight.to(torch.float32) + self.delta(key)).to(weight.dtype)

    def files(self) -> list[Path]:
        return self.adapter.files()


def base_weights(base: TensorReader, modules: Iterable[LoRAModule]) -> CanonicalSource:
    """The base model restricted to the LoRA target weights (the pool's pretrained side)."""
    names = {}
    for m in modules:
        if m.weight not in base:
            raise MergeBenchError(f"{base.name}: lacks LoRA target weight {m.weight!r}")
        names[m.weight] = m.weight
    return CanonicalSource(base, names)


__all__ = [
    "PEFT_PREFIX",
    "IdentitySource",
    "LoRADeltaSource",
    "LoRAModule",
    "base_weights",
    "lora_delta",
    "lora_modules",
    "lora_scale",
]
