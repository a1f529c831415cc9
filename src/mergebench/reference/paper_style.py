"""The data-free methods in memory, as the papers' reference code writes them.

Like the TIES notebook (`state_dict_to_vector`, `topk_values_mask` with `kthvalue`) and
the official EMR code (`emr_merge`: a running max over tasks, one bool mask per task and
tensor, `mean(abs(.))` per tensor for the rescalers): each checkpoint is loaded whole and
flattened into one float32 vector, the task vectors are stacked into one `[N, P]` matrix,
and masks are bool tensors. Semantics follow docs/methods.md exactly (where the papers'
code differs, e.g. TIES' `kthvalue` keeps one entry more and gives a zero sum the majority
sign, we follow the contract), and sums over tasks add rows in task order, as the papers'
code does when it adds task vectors one after the other.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from mergebench.methods.registry import method_defaults

SINGLE = ("weight_averaging", "task_arithmetic", "ties", "dare")
CONDITIONED = ("emr", "mask_rescale")


@dataclass
class ReferenceResult:
    method: str
    tasks: list[str]
    shapes: dict[str, torch.Size]
    dtypes: dict[str, torch.dtype]
    merged: dict[str, torch.Tensor] | None = None  # single model: W per merged key
    unified: dict[str, torch.Tensor] | None = None  # task-conditioned: tau_uni per key
    masks: dict[str, list[torch.Tensor]] | None = None  # per key: one bool tensor per task
    rescalers: dict[str, float] = field(default_factory=dict)


def merge_reference(
    method: str,
    pretrained: str | Path | Mapping[str, torch.Tensor],
    finetuned: Mapping[str, str | Path | Mapping[str, torch.Tensor]],
    exclude: Iterable[str] = (),
    **params: Any,
) -> ReferenceResult:
    """Merge in memory; `params` override the defaults of `conf/method/<method>.yaml`."""
    params = {**method_defaults(method), **params}
    pre_sd = _load(pretrained)
    patterns = [re.compile(p) for p in exclude]
    keys = [
        k
        for k, v in pre_sd.items()
        if v.is_floating_point() and not any(p.fullmatch(k) for p in patterns)
    ]
    layout = _Layout(keys, pre_sd)
    flat_pre = layout.flatten(pre_sd)
    # One vector per fine-tuned model, stacked; each loaded state dict is dropped after use.
    flat_ft = torch.vstack([layout.flatten(_load(ft)) for ft in finetuned.values()])
    task_vectors = flat_ft - flat_pre
    del flat_ft
    tasks = [str(t) for t in finetuned]
    result = ReferenceResult(method, tasks, layout.shapes, layout.dtypes)
    if method in SINGLE:
        merged = _single(method, params, task_vectors, flat_pre, layout)
        result.merged = layout.unflatten(merged, cast=True)
    elif method in CONDITIONED:
        if method == "emr":
            unified = (
                _elect(task_vectors, params["magnitude"])
                if params["elect"]
                else _sum_rows(task_vectors) / len(tasks)
            )
        else:
            base = _single(params["base"], _base_params(params), task_vectors, flat_pre, layout)
            # The base model as saved (cast to each key's dtype), minus the pretrained one.
            unified = layout.flatten(layout.unflatten(base, cast=True)) - flat_pre
        _mask_and_rescale(result, params, task_vectors, unified, layout)
    else:
        raise ValueError(f"no reference implementation for method {method!r}")
    return result


def save_reference(result: ReferenceResult, path: str | Path) -> Path:
    """`torch.save` the result as the papers' code does (task-conditioned: bool masks)."""
    path = Path(path)
    if result.merged is not None:
        payload: dict[str, Any] = dict(result.merged)
    else:
        payload = {
            "unified": result.unified,
            "masks": result.masks,
            "rescalers": result.rescalers,
            "tasks": result.tasks,
        }
    torch.save(payload, path)
    return path


# --- loading and flattening ---------------------------------------------------------------
def _load(checkpoint: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint)
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class _Layout:
    """Where each merged key lives in the flat vector (the `state_dict_to_vector` order)."""

    def __init__(self, keys: list[str], reference: Mapping[str, torch.Tensor]) -> None:
        self.keys = keys
        self.shapes = {k: reference[k].shape for k in keys}
        self.dtypes = {k: reference[k].dtype for k in keys}
        self.slices: dict[str, slice] = {}
        offset = 0
        for k in keys:
            size = reference[k].numel()
            self.slices[k] = slice(offset, offset + size)
            offset += size
        self.size = offset

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[k].reshape(-1).to(torch.float32) for k in self.keys])

    def unflatten(self, vector: torch.Tensor, cast: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.keys:
            value = vector[self.slices[k]].view(self.shapes[k])
            out[k] = value.to(self.dtypes[k]) if cast else value
        return out


def _sum_rows(matrix: torch.Tensor) -> torch.Tensor:
    """`tau_1 + tau_2 + ...`, one task vector after the other."""
    total = matrix[0].clone()
    for row in matrix[1:]:
        total += row
    return total


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0, -1.0)  # zero counts as negative (methods.md)


# --- single-model methods -----------------------------------------------------------------
def _single(
    method: str,
    params: dict[str, Any],
    task_vectors: torch.Tensor,
    flat_pre: torch.Tensor,
    layout: _Layout,
) -> torch.Tensor:
    n = task_vectors.shape[0]
    if method == "weight_averaging":
        return flat_pre + _sum_rows(task_vectors) / n
    if method == "task_arithmetic":
        return flat_pre + params["scaling"] * _sum_rows(task_vectors)
    if method == "ties":
        return flat_pre + params["scaling"] * _ties_merge(task_vectors, params, layout)
    if method == "dare":
        dropped = _dare(task_vectors, params, layout)
        return _single(params["base"], _base_params(params), dropped, flat_pre, layout)
    raise ValueError(f"no reference implementation for base method {method!r}")


def _base_params(params: dict[str, Any]) -> dict[str, Any]:
    return {**method_defaults(params["base"]), **(params.get("base_params") or {})}


def _ties_merge(
    task_vectors: torch.Tensor, params: dict[str, Any], layout: _Layout
) -> torch.Tensor:
    """TIES notebook: `topk_values_mask`, `resolve_sign`, `disjoint_merge`."""
    n, size = task_vectors.shape
    if params["topk_scope"] == "global":
        keep = max(1, int(params["k"] * size + 0.5))
        # The keep-th largest |value| is the (size - keep + 1)-th smallest.
        kth = task_vectors.abs().kthvalue(size - keep + 1, dim=1, keepdim=True).values
        mask = task_vectors.abs() >= kth
    else:
        mask = torch.zeros_like(task_vectors, dtype=torch.bool)
        for part in layout.slices.values():
            block = task_vectors[:, part]
            width = block.shape[1]
            keep = max(1, int(params["k"] * width + 0.5))
            kth = block.abs().kthvalue(width - keep + 1, dim=1, keepdim=True).values
            mask[:, part] = block.abs() >= kth
    trimmed = task_vectors * mask
    gamma = _sign(_sum_rows(trimmed))
    rows_to_keep = trimmed * gamma > 0
    selected = trimmed * rows_to_keep
    total = _sum_rows(selected)
    if params["aggregate"] == "sum":
        return total
    count = rows_to_keep.sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _dare(task_vectors: torch.Tensor, params: dict[str, Any], layout: _Layout) -> torch.Tensor:
    """DARE: drop with probability p, rescale by 1/(1-p). Draws as docs/methods.md says: per
    task and key, a Philox-4x64 stream keyed by SeedSequence([|seed|, seed < 0, task, blake2b
    of the key]) from counter 0, entry i taking the low (even i) or high (odd i) 32 bits of
    uint64 output i // 2, kept where that word >= ceil(p * 2^32); drawn whole per key."""
    p, seed, dropped = params["drop"], params["seed"], torch.empty_like(task_vectors)
    threshold = math.ceil(p * 2.0**32)
    for index in range(task_vectors.shape[0]):
        for key, part in layout.slices.items():
            digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
            entropy = [abs(seed), int(seed < 0), index, int.from_bytes(digest, "little")]
            philox = np.random.SeedSequence(entropy).generate_state(2, np.uint64)
            n = part.stop - part.start
            raw = np.random.Philox(key=philox).random_raw((n + 1) // 2).astype(np.uint64)
            words = np.stack([raw & np.uint64(0xFFFFFFFF), raw >> np.uint64(32)], axis=1)
            keep = torch.from_numpy(words.reshape(-1)[:n] >= threshold)
            values = task_vectors[index, part] * keep
            dropped[index, part] = values / (1.0 - p) if params["rescale"] else values
    return dropped


# --- EMR and "X w/ M&R" -------------------------------------------------------------------
def _elect(task_vectors: torch.Tensor, magnitude: str = "max") -> torch.Tensor:
    """Official `emr_merge`: flag = sign of the sum; running max of agreeing |tau_t|
    (`magnitude="sum"`: the BEiT-3 script's `EMR_merge`, a running sum)."""
    flag = _sign(_sum_rows(task_vectors))
    param_max = torch.zeros_like(flag)
    for tau in task_vectors:
        agreeing = tau * flag > 0
        param_abs = torch.abs(agreeing * tau)
        if magnitude == "sum":
            param_max += param_abs
        else:
            param_max = torch.where(param_abs > param_max, param_abs, param_max)
    return param_max * flag


def _mask_and_rescale(
    result: ReferenceResult,
    params: dict[str, Any],
    task_vectors: torch.Tensor,
    unified: torch.Tensor,
    layout: _Layout,
) -> None:
    n = task_vectors.shape[0]
    # One bool mask per task over the whole vector: tau_t and tau_uni non-zero, same sign
    # (signs compared, as methods.md says: the product would underflow for tiny entries).
    masks = (
        [torch.sign(tau) * torch.sign(unified) > 0 for tau in task_vectors]
        if params["mask"]
        else None
    )
    result.unified = layout.unflatten(unified)
    if masks is not None:
        result.masks = {
            k: [m[part].view(layout.shapes[k]) for m in masks] for k, part in layout.slices.items()
        }
    if not params["rescale"]:
        result.rescalers = {t: 1.0 for t in result.tasks}
        return
    numerator = torch.zeros(n, dtype=torch.float64)
    denominator = torch.zeros(n, dtype=torch.float64)
    reduce = torch.mean if params["rescaler"] == "tensor_mean" else torch.sum
    for part in layout.slices.values():
        if part.stop == part.start:
            continue  # an empty tensor has no mean; it adds nothing
        uni = unified[part]
        for t in range(n):
            numerator[t] += reduce(torch.abs(task_vectors[t, part]).double())
            masked = uni if masks is None else uni * masks[t][part]
            denominator[t] += reduce(torch.abs(masked).double())
    values = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), 0.0)
    result.rescalers = {t: float(v) for t, v in zip(result.tasks, values, strict=True)}
