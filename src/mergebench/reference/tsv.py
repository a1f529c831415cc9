"""TSV-M in memory, straight from docs/methods.md, in float64: a yardstick for `methods.tsv`.

Whole state dicts in, a state dict out; no code shared with `mergebench.methods`. The SVDs
are numpy's (float64 LAPACK) and the polar factor is computed another way than the method
does: `X (X^T X)^{+1/2}` from an eigendecomposition of the Gram matrix (the pseudo-inverse
square root, so zero columns stay zero). `sign_seed` flips the signs of random singular
vector pairs `(u_i, v_i)` of every SVD: results must not change.

The helpers here (`merged_keys`, `svd64`, `polar64`, `finish`) serve the other references
(`iso`, `cart`, `wudi`) too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import torch

StateDict = Mapping[str, torch.Tensor]


def merged_keys(pretrained: StateDict, finetuned: Mapping[str, StateDict], exclude: Iterable[str]):
    """The merged keys: floating point, in every model with one shape, no `exclude` match."""
    patterns = [re.compile(p) for p in exclude]
    return [
        key
        for key, value in pretrained.items()
        if value.is_floating_point()
        and not any(p.fullmatch(key) for p in patterns)
        and all(key in ft and ft[key].shape == value.shape for ft in finetuned.values())
    ]


def task_vectors64(
    key: str, pretrained: StateDict, finetuned: Mapping[str, StateDict]
) -> list[np.ndarray]:
    pre = pretrained[key].double().numpy()
    return [ft[key].double().numpy() - pre for ft in finetuned.values()]


def svd64(x: np.ndarray, rng: np.random.Generator | None = None):
    """Thin SVD in float64; with `rng`, random pairs `(u_i, v_i)` change sign."""
    u, s, vh = np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)
    if rng is not None:
        flips = rng.choice([-1.0, 1.0], size=s.shape[0])
        u, vh = u * flips, vh * flips[:, None]
    return u, s, vh


def polar64(x: np.ndarray) -> np.ndarray:
    """`X (X^T X)^{+1/2}`: the orthogonal polar factor (a partial isometry if rank-deficient)."""
    values, vectors = np.linalg.eigh(x.T @ x)
    cutoff = values.max(initial=0.0) * x.shape[1] * np.finfo(np.float64).eps * 10
    inv_sqrt = np.where(values > cutoff, 1.0 / np.sqrt(np.where(values > cutoff, values, 1.0)), 0.0)
    return x @ (vectors * inv_sqrt) @ vectors.T


def finish(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    keys: list[str],
    deltas: Mapping[str, np.ndarray],
) -> dict[str, torch.Tensor]:
    """`W = W_pre + delta` on merged keys (cast to the pretrained dtype); non-floating
    tensors copied from `W_pre`. Excluded (task-specific) keys are left out."""
    out: dict[str, torch.Tensor] = {}
    for key, value in pretrained.items():
        if key in deltas:
            merged = value.double() + torch.from_numpy(np.asarray(deltas[key]))
            out[key] = merged.to(value.dtype)
        elif not value.is_floating_point():
            out[key] = value.clone()
    assert set(deltas) == set(keys)
    return out


def tsv_delta64(taus: list[np.ndarray], rng: np.random.Generator | None = None) -> np.ndarray:
    n_tasks = len(taus)
    if taus[0].ndim != 2:
        return sum(taus[1:], taus[0].copy()) / n_tasks
    m, n = taus[0].shape
    r = min(m, n)
    k = r // n_tasks
    u_cat, s_cat, vh_cat = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    if k == 0:
        return np.zeros((m, n))
    for t, tau in enumerate(taus):
        u, s, vh = svd64(tau, rng)
        u_cat[:, t * k : (t + 1) * k] = u[:, :k]
        s_cat[t * k : (t + 1) * k] = s[:k]
        vh_cat[t * k : (t + 1) * k, :] = vh[:k, :]
    u_perp = polar64(u_cat)
    vh_perp = polar64(vh_cat.T).T  # polar factor of V^T = (polar factor of V)^T
    return u_perp @ np.diag(s_cat) @ vh_perp


def merge_tsv(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    exclude: Iterable[str] = (),
    scaling: float = 1.0,
    sign_seed: int | None = None,
) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(sign_seed) if sign_seed is not None else None
    keys = merged_keys(pretrained, finetuned, exclude)
    deltas = {
        key: scaling * tsv_delta64(task_vectors64(key, pretrained, finetuned), rng) for key in keys
    }
    return finish(pretrained, finetuned, keys, deltas)
