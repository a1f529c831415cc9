"""Model Breadcrumbs in memory, straight from docs/methods.md (no code shared with
`mergebench.methods.breadcrumbs`): whole state dicts, numpy, one row at a time.

Per task, tensor and row (last dimension) of `n` entries: `g = floor(outlier * n)`,
`k = floor(density * n)`; order the row by |tau| descending, equal values lower index
first (`np.lexsort` on (index, -|tau|)); keep the entries at 1-based ranks `g+1 .. g+k`
that exist; 0-D tensors are kept whole. `W = W_pre + scaling * sum_t crumbs(tau_t)`, the
task vectors added one after the other in task order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import numpy as np
import torch


def merged_keys(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    exclude: Iterable[str] = (),
) -> list[str]:
    """Floating keys of the pretrained model, in every fine-tuned one, not excluded."""
    patterns = [re.compile(p) for p in exclude]
    return [
        k
        for k, v in pretrained.items()
        if v.is_floating_point()
        and not any(p.fullmatch(k) for p in patterns)
        and all(k in ft and ft[k].shape == v.shape for ft in finetuned.values())
    ]


def crumbs_row(row: np.ndarray, density: float, outlier: float) -> np.ndarray:
    n = row.shape[0]
    g = math.floor(outlier * n)
    k = math.floor(density * n)
    order = np.lexsort((np.arange(n), -np.abs(row)))  # last key is primary: |tau| descending
    out = np.zeros_like(row)
    for rank in range(g + 1, g + k + 1):  # 1-based ranks g+1 .. g+k, those that exist
        if rank <= n:
            out[order[rank - 1]] = row[order[rank - 1]]
    return out


def crumbs(tau: torch.Tensor, density: float, outlier: float, scope: str = "row") -> torch.Tensor:
    if tau.dim() == 0:
        return tau.clone()
    values = tau.to(torch.float32).numpy()
    rows = values.reshape(1, -1) if scope == "tensor" else values.reshape(-1, values.shape[-1])
    out = np.stack([crumbs_row(r, density, outlier) for r in rows]) if rows.size else rows
    return torch.from_numpy(out.reshape(values.shape).copy())


def breadcrumbs_reference(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    exclude: Iterable[str] = (),
    density: float = 0.1,
    outlier: float = 0.01,
    scaling: float = 1.0,
    scope: str = "row",
) -> dict[str, torch.Tensor]:
    """The merged weights of every merged key (cast to the pretrained dtype)."""
    out = {}
    for key in merged_keys(pretrained, finetuned, exclude):
        pre = pretrained[key].to(torch.float32)
        total = None
        for ft in finetuned.values():
            crumb = crumbs(ft[key].to(torch.float32) - pre, density, outlier, scope)
            total = crumb if total is None else total + crumb
        out[key] = (pre + scaling * total).to(pretrained[key].dtype)
    return out
