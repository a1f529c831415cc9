"""Iso-C and Iso-CTS in memory, straight from docs/methods.md, in float64: yardsticks for
`methods.iso_c` and `methods.iso_cts`.

Numpy SVDs, the polar factor from the Gram matrix (`reference.tsv.polar64`), `sign_seed`
flips random singular vector pairs (results must not change). For Iso-C, `U V^T` is the
polar factor of the task sum, here `S (S^T S)^{-1/2}`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from mergebench.reference.tsv import (
    StateDict,
    finish,
    merged_keys,
    polar64,
    svd64,
    task_vectors64,
)


def _mean(taus: list[np.ndarray]) -> np.ndarray:
    return sum(taus[1:], taus[0].copy()) / len(taus)


def iso_c_delta64(taus: list[np.ndarray]) -> np.ndarray:
    total = sum(taus[1:], taus[0].copy())
    if total.ndim != 2:
        return total / len(taus)
    singular = np.linalg.svd(total, compute_uv=False)  # all min(m, n) values
    return singular.mean() * polar64(total)


def iso_cts_split(r: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """`(k_c, n_t)` as methods.md writes them (with the `t_tot > r` cap of methods.iso_cts)."""
    k0 = math.floor(common_fraction * r)
    quotient = (r - k0) / n_tasks
    low = math.floor(quotient)
    # round half to even, written out
    if quotient - low > 0.5 or (quotient - low == 0.5 and low % 2 == 1):
        low += 1
    t_tot = low * n_tasks
    if t_tot > r:
        t_tot -= n_tasks
    return r - t_tot, t_tot // n_tasks


def iso_cts_delta64(
    taus: list[np.ndarray], common_fraction: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    n_tasks = len(taus)
    if taus[0].ndim != 2:
        return _mean(taus)
    m, n = taus[0].shape
    r = min(m, n)
    k_c, n_t = iso_cts_split(r, n_tasks, common_fraction)
    u, s, vh = svd64(sum(taus[1:], taus[0].copy()), rng)
    u_c, s_c, vh_c = u[:, :k_c], s[:k_c], vh[:k_c]
    u_blocks, s_blocks, vh_blocks = [], [], []
    for tau in taus:
        residual = tau - u_c @ (u_c.T @ tau)
        u_t, s_t, vh_t = svd64(residual, rng)
        u_blocks.append(u_t[:, :n_t])
        s_blocks.append(s_t[:n_t])
        vh_blocks.append(vh_t[:n_t])
    u_all = np.concatenate([*u_blocks, u_c], axis=1)
    s_all = np.concatenate([*s_blocks, s_c])
    vh_all = np.concatenate([*vh_blocks, vh_c], axis=0)
    assert u_all.shape == (m, r) and vh_all.shape == (r, n)
    return s_all.mean() * polar64(u_all) @ polar64(vh_all.T).T


def merge_iso_c(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    exclude: Iterable[str] = (),
    scaling: float = 1.0,
) -> dict[str, torch.Tensor]:
    keys = merged_keys(pretrained, finetuned, exclude)
    deltas = {
        key: scaling * iso_c_delta64(task_vectors64(key, pretrained, finetuned)) for key in keys
    }
    return finish(pretrained, finetuned, keys, deltas)


def merge_iso_cts(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    exclude: Iterable[str] = (),
    scaling: float = 1.0,
    common_fraction: float = 0.8,
    sign_seed: int | None = None,
) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(sign_seed) if sign_seed is not None else None
    keys = merged_keys(pretrained, finetuned, exclude)
    deltas = {
        key: scaling
        * iso_cts_delta64(task_vectors64(key, pretrained, finetuned), common_fraction, rng)
        for key in keys
    }
    return finish(pretrained, finetuned, keys, deltas)
