"""SLERP in memory, straight from docs/methods.md (no code shared with `methods.slerp`).

Whole state dicts, numpy: per merged key the two models flattened, normalized into new
float64 vectors (`||v|| <= 1e-8`: left as they are), `d = sum(a * b)`, then the lerp or the
slerp formula on the float32 models themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from mergebench.reference.tsv import StateDict, merged_keys


def normalized(v: np.ndarray) -> np.ndarray:
    wide = v.astype(np.float64)
    norm = float(np.linalg.norm(wide))
    return wide / norm if norm > 1e-8 else wide


def slerp_vectors(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """SLERP of two flat float32 vectors (float32 out)."""
    d = float(np.sum(normalized(v0) * normalized(v1)))
    if abs(d) > 0.9995:
        return ((1 - t) * v0 + t * v1).astype(np.float32)
    theta = math.acos(d)
    s0 = math.sin((1 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return (s0 * v0 + s1 * v1).astype(np.float32)


def slerp_reference(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    exclude: Iterable[str] = (),
    t: float = 0.5,
    endpoints: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The merged weights of every merged key (cast to the pretrained dtype)."""
    first, second = endpoints or list(finetuned)
    out = {}
    for key in merged_keys(pretrained, finetuned, exclude):
        v0 = finetuned[first][key].to(torch.float32).numpy().reshape(-1)
        v1 = finetuned[second][key].to(torch.float32).numpy().reshape(-1)
        merged = slerp_vectors(t, v0, v1).reshape(tuple(pretrained[key].shape))
        out[key] = torch.from_numpy(merged).to(pretrained[key].dtype)
    return out
