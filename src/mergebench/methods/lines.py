"""LiNeS: scale the base merge's vector by a factor growing linearly with depth (methods.md).

1. `tau_MTL` = the base's merged vector before its scaling: `task_arithmetic` `sum_t tau_t`;
   `ties` TIES with `k=0.2`, `topk_scope=global` and `aggregate=mean`; `consensus`
   `c * sum_t tau_t` with the consensus defaults (`threshold=0.6`, `k=2`, base
   `task_arithmetic`).
2. `alpha = ||sum_t tau_t||_1 / (N * ||tau_MTL||_1)` over all merged entries (float64 sums,
   key by key in key order, in a pass before the merge); exactly `1/N` for task arithmetic
   (the two norms are the same number, so no pass is made). Where `tau_MTL` is zero
   everywhere, `alpha = 0` (the weights are `W_pre` whatever alpha is).
3. A key's block `l` is the integer captured by `layer_pattern` (one group, `re.search`);
   `L` = largest `l` over the merged keys + 1; `lambda(l) = alpha + beta * l / (L - 1)`
   (`alpha` when `L = 1`); keys outside every block get `alpha`.
4. `W = W_pre + lambda(key) * tau_MTL[key]`.

`layer_pattern: null` takes the pool's (`ModelPool.layer_pattern`, set by the family).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from mergebench.engine.stream import TaskVectorStream, TensorItem
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.consensus import consensus_vector
from mergebench.methods.options import choice, number, option
from mergebench.methods.tall_masks import multitask_vector
from mergebench.methods.ties import Ties
from mergebench.util.errors import MergeBenchError

BASES = ("task_arithmetic", "ties", "consensus")
TIES_K = 0.2  # the TIES default (conf/method/ties.yaml), global top-k
CONSENSUS_THRESHOLD = 0.6  # the consensus defaults (conf/method/consensus.yaml)
CONSENSUS_K = 2


def compile_layer_pattern(name: str, option: str, pattern: Any) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise MergeBenchError(f"{name}.{option}: {pattern!r} is not a regex string")
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise MergeBenchError(f"{name}.{option}: invalid regex {pattern!r} ({err})") from None
    if compiled.groups != 1:
        raise MergeBenchError(
            f"{name}.{option}: {pattern!r} must have exactly one group (the block number), "
            f"it has {compiled.groups}"
        )
    return compiled


def finite_at_least_zero(where: str, given: Any, value: float, earlier: Mapping[str, Any]) -> None:
    if not value >= 0:
        raise MergeBenchError(f"{where}: {given!r} must be a finite number >= 0")


def key_blocks(name: str, pattern: re.Pattern[str], keys: list[str]) -> dict[str, int | None]:
    """The block number of each key (None: outside every block)."""
    blocks: dict[str, int | None] = {}
    for key in keys:
        found = pattern.search(key)
        if found is None or found.group(1) is None:
            blocks[key] = None
            continue
        try:
            blocks[key] = int(found.group(1))
        except ValueError:
            raise MergeBenchError(
                f"{name}.layer_pattern: {pattern.pattern!r} captures {found.group(1)!r} in key "
                f"{key!r}, not a block number"
            ) from None
    return blocks


def layer_scalings(blocks: dict[str, int | None], alpha: float, beta: float) -> dict[str, float]:
    """`lambda(key) = alpha + beta * l / (L - 1)`; `alpha` for `L = 1` and outside blocks."""
    numbers = [b for b in blocks.values() if b is not None]
    count = max(numbers) + 1 if numbers else 0
    scalings = {}
    for key, block in blocks.items():
        if block is None or count <= 1:
            scalings[key] = alpha
        else:
            scalings[key] = alpha + beta * block / (count - 1)
    return scalings


class LiNeS(TaskVectorMethod):
    name = "lines"

    base: str = option(choice, allowed=BASES)
    beta: float = option(number, also=finite_at_least_zero)
    layer_pattern: re.Pattern[str] | None = option(compile_layer_pattern)  # null: the pool's

    def setup(self) -> None:
        self._ties: Ties | None = None
        self._thresholds: list[float] = []
        self._scalings: dict[str, float] = {}
        self.alpha: float | None = None

    def multitask(
        self, key: str, task_vectors: torch.Tensor, task_sum: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`tau_MTL` of one key, unscaled (a new tensor)."""
        if self.base == "ties":
            return multitask_vector(key, task_vectors, "ties", self._ties)
        total = multitask_vector(key, task_vectors, "task_arithmetic", None, task_sum)
        if self.base == "consensus":
            return consensus_vector(task_vectors, total, self._thresholds, CONSENSUS_K)
        return total

    def prepare(self, stream: TaskVectorStream) -> None:
        pattern = self.layer_pattern
        if pattern is None:
            pool_pattern = getattr(stream.pool, "layer_pattern", None)
            pattern = compile_layer_pattern(self.name, "layer_pattern", pool_pattern)
        if pattern is None:
            raise MergeBenchError(
                f"{self.name}.layer_pattern: not set, and the pool's model family gives none "
                "(pass a regex with one group capturing the block number)"
            )
        blocks = key_blocks(self.name, pattern, stream.plan.merged)
        if all(block is None for block in blocks.values()):
            raise MergeBenchError(
                f"{self.name}.layer_pattern: {pattern.pattern!r} matches no merged key"
            )
        n = len(stream.tasks)
        self._thresholds = [CONSENSUS_THRESHOLD] * n
        if self.base == "ties":
            self._ties = Ties(k=TIES_K, scaling=1.0, aggregate="mean", topk_scope="global")
            self._ties.prepare(stream)
        if self.base == "task_arithmetic":
            self.alpha = 1.0 / n  # ||sum_t tau_t||_1 / (N * ||sum_t tau_t||_1)
        else:
            self.alpha = self._alpha(stream)
        self._scalings = layer_scalings(blocks, self.alpha, self.beta)

    def _alpha(self, stream: TaskVectorStream) -> float:
        def norms(item: TensorItem) -> tuple[float, float]:
            total = item.task_sum()
            multitask = self.multitask(item.key, item.task_vectors, total)
            return (
                float(total.abs().sum(dtype=torch.float64)),
                float(multitask.abs().sum(dtype=torch.float64)),
            )

        total_norm = multitask_norm = 0.0
        for _, (a, b) in stream.map(norms, f"{self.name}: alpha"):  # key order
            total_norm += a
            multitask_norm += b
        n = len(stream.tasks)
        return total_norm / (n * multitask_norm) if multitask_norm > 0 else 0.0

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        return self._scalings[item.key] * self.multitask(
            item.key, item.task_vectors, item.task_sum()
        )

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return self._scalings[key] * self.multitask(key, task_vectors)
