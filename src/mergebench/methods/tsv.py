"""TSV-M (Task Singular Vectors: Merge): `W = W_pre + scaling * delta` (methods.md).

Per matrix `tau_t` (`m x n`, `r = min(m, n)`, `k = floor(r / N)`): the top `k` singular
triplets of each task fill block `[t*k, (t+1)*k)` of `U (m x r)`, `s (r)`, `V^T (r x n)`
in task order (entries past `N*k` stay zero); `U` and `V^T` are replaced by their polar
factors and `delta = U_perp diag(s) V_perp^T`. `k = 0` (more tasks than the rank) gives
`delta = 0`. Every other tensor: `delta = mean_t tau_t`.

The polar factor of a `U` with zero columns is not unique on those columns, but they meet
`s = 0` in `U_perp diag(s) V_perp^T`, so `delta` is (the polar factor restricted to the
non-zero columns is unique when they are linearly independent, as generic task vectors are).
A task vector of rank below `k` (e.g. a LoRA update) fills its block with singular vectors
of singular value 0, which the SVD picks arbitrarily; they still enter the polar factors,
so there `delta` depends on the SVD library (as in the official code).
"""

from __future__ import annotations

import torch

from mergebench.engine.stream import sum_tasks
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.options import number, option
from mergebench.methods.svd_utils import is_matrix, polar, svd


def tsv_block_size(rank: int, num_tasks: int) -> int:
    """`k = floor(r / N)` singular triplets per task."""
    return rank // num_tasks


def tsv_matrix(task_vectors: torch.Tensor) -> torch.Tensor:
    """TSV-M's unscaled `delta` for a stack of matrices `[N, m, n]` (float32 or float64)."""
    n_tasks, m, n = task_vectors.shape
    r = min(m, n)
    k = tsv_block_size(r, n_tasks)
    like = dict(dtype=task_vectors.dtype, device=task_vectors.device)
    if k == 0:
        return torch.zeros((m, n), **like)
    u_all = torch.zeros((m, r), **like)
    s_all = torch.zeros(r, **like)
    vh_all = torch.zeros((r, n), **like)
    for t in range(n_tasks):
        u, s, vh = svd(task_vectors[t])
        block = slice(t * k, (t + 1) * k)
        u_all[:, block] = u[:, :k]
        s_all[block] = s[:k]
        vh_all[block] = vh[:k]
    return (polar(u_all) * s_all) @ polar(vh_all)


def tsv_delta(task_vectors: torch.Tensor) -> torch.Tensor:
    """Unscaled `delta` of any merged tensor: TSV-M for matrices, the task mean otherwise."""
    if is_matrix(task_vectors):
        return tsv_matrix(task_vectors)
    return sum_tasks(task_vectors) / task_vectors.shape[0]


class TSV(TaskVectorMethod):
    name = "tsv"
    post_scaling = "scaling"

    scaling: float = option(number)

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return self.scaling * tsv_delta(task_vectors)
