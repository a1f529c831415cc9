"""TALL masks and Consensus merging in memory, straight from docs/methods.md (no code
shared with `mergebench.methods`): every task vector flattened into one vector, the way
the tall_masks repository works on flattened state dicts.

- `tau_MTL`: `task_arithmetic` = task vectors added one after the other; `ties` = TIES
  (trim to the top `k` of each task over the whole flattened vector, keep =
  `max(1, floor(k * n + 0.5))`, ties at the threshold kept; elect `sgn` of the trimmed sum
  with zero counting as negative; disjoint `sum` or `mean`), unscaled.
- `m_t = |tau_t| > threshold_t * |tau_MTL - tau_t|`.
- TALL: task `t` gets `W_pre + m_t * tau_MTL`; Consensus: `c = (sum_t m_t >= k)`,
  `W = W_pre + scaling * (c * tau_MTL)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from mergebench.reference.breadcrumbs import merged_keys


@dataclass
class Flat:
    """Merged keys flattened into one float32 vector per model."""

    keys: list[str]
    shapes: dict[str, torch.Size]
    dtypes: dict[str, torch.dtype]
    pretrained: torch.Tensor  # [P]
    task_vectors: list[torch.Tensor]  # N x [P]

    def split(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for key in self.keys:
            size = math.prod(self.shapes[key])
            out[key] = vector[offset : offset + size].reshape(self.shapes[key])
            offset += size
        return out


def flatten(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    exclude: Iterable[str] = (),
) -> Flat:
    keys = merged_keys(pretrained, finetuned, exclude)

    def flat(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[k].reshape(-1).to(torch.float32) for k in keys])

    pre = flat(pretrained)
    return Flat(
        keys,
        {k: pretrained[k].shape for k in keys},
        {k: pretrained[k].dtype for k in keys},
        pre,
        [flat(ft) - pre for ft in finetuned.values()],
    )


def add_in_order(vectors: list[torch.Tensor]) -> torch.Tensor:
    total = vectors[0].clone()
    for v in vectors[1:]:
        total = total + v
    return total


def ties_vector(task_vectors: list[torch.Tensor], k: float, aggregate: str) -> torch.Tensor:
    """TIES' merged vector before scaling, global top-k over the flattened vector."""
    trimmed = []
    for tau in task_vectors:
        n = tau.numel()
        keep = max(1, math.floor(k * n + 0.5))
        threshold = tau.abs().sort(descending=True).values[keep - 1]
        trimmed.append(torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)))
    total = add_in_order(trimmed)
    gamma = torch.where(total > 0, 1.0, -1.0)
    agree = [(t != 0) & (torch.sign(t) == gamma) for t in trimmed]
    merged = add_in_order(
        [torch.where(a, t, torch.zeros_like(t)) for a, t in zip(agree, trimmed, strict=True)]
    )
    if aggregate == "sum":
        return merged
    count = add_in_order([a.to(torch.int64) for a in agree])
    return torch.where(count > 0, merged / count.clamp(min=1).to(torch.float32), 0.0)


def multitask_vector(flat: Flat, base: str) -> torch.Tensor:
    if base == "task_arithmetic":
        return add_in_order(flat.task_vectors)
    if base == "ties":
        return ties_vector(flat.task_vectors, 0.2, "sum")
    raise ValueError(f"no reference base {base!r}")


def masks(flat: Flat, multitask: torch.Tensor, thresholds: list[float]) -> list[torch.Tensor]:
    return [
        tau.abs() > threshold * (multitask - tau).abs()
        for tau, threshold in zip(flat.task_vectors, thresholds, strict=True)
    ]


def _thresholds(threshold: float | Mapping[str, float], tasks: list[str]) -> list[float]:
    if isinstance(threshold, Mapping):
        return [float(threshold[t]) for t in tasks]
    return [float(threshold)] * len(tasks)


@dataclass
class TallReference:
    unified: dict[str, torch.Tensor]  # tau_MTL per key
    masks: dict[str, dict[str, torch.Tensor]]  # task -> key -> bool mask
    weights: dict[str, dict[str, torch.Tensor]]  # task -> key -> W_pre + m_t * tau_MTL


def tall_masks_reference(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    exclude: Iterable[str] = (),
    base: str = "task_arithmetic",
    threshold: float | Mapping[str, float] = 0.6,
) -> TallReference:
    tasks = list(finetuned)
    flat = flatten(pretrained, finetuned, exclude)
    multitask = multitask_vector(flat, base)
    task_masks = masks(flat, multitask, _thresholds(threshold, tasks))
    unified = flat.split(multitask)
    result = TallReference(unified, {}, {})
    for task, mask in zip(tasks, task_masks, strict=True):
        result.masks[task] = flat.split(mask)
        weights = flat.split(flat.pretrained + mask * multitask)
        result.weights[task] = {k: v.to(flat.dtypes[k]) for k, v in weights.items()}
    return result


def consensus_vector(
    flat: Flat, base: str, threshold: float | Mapping[str, float], k: int, tasks: list[str]
) -> torch.Tensor:
    """`c * tau_MTL`, flattened."""
    multitask = multitask_vector(flat, base)
    votes = add_in_order(
        [m.to(torch.int64) for m in masks(flat, multitask, _thresholds(threshold, tasks))]
    )
    return torch.where(votes >= k, multitask, torch.zeros_like(multitask))


def consensus_reference(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    exclude: Iterable[str] = (),
    base: str = "task_arithmetic",
    threshold: float | Mapping[str, float] = 0.6,
    k: int = 2,
    scaling: float = 0.3,
) -> dict[str, torch.Tensor]:
    flat = flatten(pretrained, finetuned, exclude)
    merged = flat.pretrained + scaling * consensus_vector(flat, base, threshold, k, list(finetuned))
    return {key: v.to(flat.dtypes[key]) for key, v in flat.split(merged).items()}
