"""CART in memory, straight from docs/methods.md, in float64: a yardstick for `methods.cart`.

`W_avg = W_pre + mean_t tau_t`; per matrix `delta_t = W_t - W_avg` (from the fine-tuned
weights themselves), rank-`k` truncated with numpy's SVD (`sign_seed` flips random singular
vector pairs), `W = W_avg + scaling * sum_t delta_t'`; every other tensor `W_avg`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from mergebench.reference.tsv import StateDict, merged_keys, svd64


def merge_cart(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    exclude: Iterable[str] = (),
    rank_ratio: float = 0.12,
    scaling: float = 2.0,
    sign_seed: int | None = None,
) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(sign_seed) if sign_seed is not None else None
    keys = set(merged_keys(pretrained, finetuned, exclude))
    out: dict[str, torch.Tensor] = {}
    for key, value in pretrained.items():
        if key not in keys:
            if not value.is_floating_point():
                out[key] = value.clone()
            continue
        pre = value.double().numpy()
        weights = [ft[key].double().numpy() for ft in finetuned.values()]
        w_avg = pre + sum(w - pre for w in weights) / len(weights)
        merged = w_avg
        if pre.ndim == 2:
            k = max(1, math.floor(rank_ratio * min(pre.shape)))
            low_rank = np.zeros_like(pre)
            for w in weights:
                u, s, vh = svd64(w - w_avg, rng)
                low_rank += u[:, :k] @ np.diag(s[:k]) @ vh[:k]
            merged = w_avg + scaling * low_rank
        out[key] = torch.from_numpy(merged).to(value.dtype)
    return out
