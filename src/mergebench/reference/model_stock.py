"""Model Stock in memory, straight from docs/methods.md, in float64 (no code shared with
`methods.model_stock`).

Whole state dicts, numpy: per merged key the offsets `W_t - W_pre` as float64 rows (the
whole tensor, or rows along the last dimension with `filter_wise`), the pairwise cosines
one pair at a time, `t = N c / (1 + (N - 1) c)` (0 where `|1 + (N - 1) c| < 1e-6`),
`W = t * mean_t W_t + (1 - t) * W_pre`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from mergebench.reference.tsv import StateDict, merged_keys


def as_rows(value: torch.Tensor, filter_wise: bool) -> np.ndarray:
    wide = value.to(torch.float64).numpy()
    if not filter_wise or wide.ndim == 0:
        return wide.reshape(1, wide.size)
    return wide.reshape(-1, wide.shape[-1]) if wide.size else wide.reshape(0, wide.shape[-1])


def stock_row(pre: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    n = len(models)
    offsets = [m - pre for m in models]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j])
            cos = np.sum(offsets[i] * offsets[j]) / max(norms, 1e-6)
            cosines.append(min(max(cos, -1.0), 1.0))
    c = sum(cosines) / len(cosines)
    denominator = 1 + (n - 1) * c
    t = n * c / denominator if abs(denominator) >= 1e-6 else 0.0
    return t * (sum(models) / n) + (1 - t) * pre


def model_stock_reference(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    exclude: Iterable[str] = (),
    filter_wise: bool = False,
) -> dict[str, torch.Tensor]:
    """The merged weights of every merged key (cast to the pretrained dtype)."""
    out = {}
    for key in merged_keys(pretrained, finetuned, exclude):
        pre = as_rows(pretrained[key], filter_wise)
        models = [as_rows(ft[key], filter_wise) for ft in finetuned.values()]
        rows = [stock_row(pre[r], [m[r] for m in models]) for r in range(pre.shape[0])]
        merged = np.stack(rows) if rows else pre
        shape = tuple(pretrained[key].shape)
        out[key] = torch.from_numpy(merged.reshape(shape)).to(pretrained[key].dtype)
    return out
