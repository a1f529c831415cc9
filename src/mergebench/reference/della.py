"""DELLA-Merging in memory, straight from docs/methods.md (no code shared with
`mergebench.methods.della`): whole state dicts, numpy for the ranks and arithmetic.

Rows are `(shape[0], -1)` (1-D: one row; 0-D: one row of one entry). Ranks ascending by
|tau| (stable), `q = (density - window/2) + window * (r - 1) / (n - 1)` in float64 then
float32 (`density` when `n = 1`), keep where a uniform float32 draw `u < q`, kept entries
divided by `q`. Draws: `torch.rand(shape)` from a generator seeded with numpy's
`SeedSequence([seed, task index, key index]).generate_state(1, uint64)` (the key index is
the position among the merged keys). Elect `+` where the task sum is `>= 0`, disjoint mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from mergebench.reference.breadcrumbs import merged_keys


def generator(seed: int, task_index: int, key_index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, task_index, key_index]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def keep_probability(tau: np.ndarray, density: float, window: float) -> np.ndarray:
    shape = tau.shape
    rows = tau.reshape(shape[0] if tau.ndim > 1 else 1, -1)
    n = rows.shape[1]
    q = np.empty(rows.shape, dtype=np.float64)
    for i, row in enumerate(rows):
        if n == 1:
            q[i] = density
            continue
        order = np.argsort(np.abs(row), kind="stable")
        for rank0, j in enumerate(order):  # rank0 = r - 1
            q[i, j] = (density - window / 2) + window * float(rank0) / (n - 1)
    return q.astype(np.float32).reshape(shape)


def della_reference(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    exclude: Iterable[str] = (),
    density: float = 0.7,
    window: float = 0.14,
    scaling: float = 1.0,
    rescale: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    out = {}
    for key_index, key in enumerate(merged_keys(pretrained, finetuned, exclude)):
        pre = pretrained[key].to(torch.float32)
        pruned = []
        for task_index, ft in enumerate(finetuned.values()):
            tau = (ft[key].to(torch.float32) - pre).numpy()
            q = keep_probability(tau, density, window)
            u = torch.rand(tau.shape, generator=generator(seed, task_index, key_index)).numpy()
            m = (u < q).astype(np.float32)
            pruned.append(m * tau / q if rescale else m * tau)
        total = pruned[0].copy()
        for p in pruned[1:]:
            total = total + p
        gamma = np.where(total >= 0, np.float32(1), np.float32(-1))
        agreeing = np.zeros_like(total)
        count = np.zeros(total.shape, dtype=np.int64)
        for p in pruned:
            agree = np.sign(p) == gamma  # non-zero with the elected sign
            agreeing = agreeing + np.where(agree, p, np.float32(0))
            count += agree
        delta = np.where(count > 0, agreeing / np.maximum(count, 1).astype(np.float32), 0)
        delta = torch.from_numpy(np.asarray(delta, dtype=np.float32).reshape(tau.shape))
        out[key] = (pre + scaling * delta).to(pretrained[key].dtype)
    return out
