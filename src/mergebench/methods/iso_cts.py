"""Iso-CTS (isotropic merge in common and task-specific subspaces) (methods.md).

Per matrix (`m x n`, `r = min(m, n)`, `N` tasks):
`k0 = floor(common_fraction * r)`, `t_tot = round_half_even((r - k0) / N) * N`,
`k_c = r - t_tot`, `n_t = t_tot / N`.
1. Common subspace: the top `k_c` singular triplets `U_c, s_c, V_c^T` of `sum_t tau_t`.
2. Task `t`: `R_t = tau_t - U_c U_c^T tau_t`, its top `n_t` singular triplets.
3. Stack the task blocks `[t*n_t, (t+1)*n_t)` in task order, then the common block
   `[N*n_t, r)`, into `U (m x r)`, `s (r)`, `V^T (r x n)`.
4. `delta = mean(s) * polar(U) polar(V^T)`; `W = W_pre + scaling * delta`.
Every other tensor: `delta = mean_t tau_t`.

Not in the contract: where rounding up makes `t_tot > r` (only when `common_fraction * r`
is below about `N / 2`, e.g. `common_fraction = 0` with `N` not dividing `r`), the formula
would give a negative common size; we take `t_tot - N` instead (`n_t = floor(r / N)`),
so `k_c >= 0`. (The official code would slice with a negative index there.)

As for Iso-C, `polar(U) polar(V^T)` weighs every stacked direction equally, so a residual
`R_t` of rank below `n_t` (or a task sum of rank below `k_c`) contributes singular vectors
of singular value 0 that the SVD picks arbitrarily: the result then depends on the SVD
library, as in the official code. Generic (full-rank) task vectors do not meet this.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from mergebench.engine.stream import TensorItem, sum_tasks
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.options import fraction, number, option
from mergebench.methods.svd_utils import is_matrix, polar, svd


def iso_cts_sizes(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """`(k_c, n_t)`: the common subspace size and the per-task size (see the module doc)."""
    k0 = math.floor(common_fraction * rank)
    # round() of a Fraction rounds half to even, exactly (no float division).
    t_tot = round(Fraction(rank - k0, num_tasks)) * num_tasks
    if t_tot > rank:
        t_tot -= num_tasks
    return rank - t_tot, t_tot // num_tasks


def iso_cts_matrix(
    task_vectors: torch.Tensor, common_fraction: float, task_sum: torch.Tensor | None = None
) -> torch.Tensor:
    """Iso-CTS's unscaled `delta` for a stack of matrices `[N, m, n]`."""
    n_tasks, m, n = task_vectors.shape
    r = min(m, n)
    k_c, n_t = iso_cts_sizes(r, n_tasks, common_fraction)
    if task_sum is None:
        task_sum = sum_tasks(task_vectors)
    u, s, vh = svd(task_sum)
    u_c, s_c, vh_c = u[:, :k_c], s[:k_c], vh[:k_c]
    like = dict(dtype=task_vectors.dtype, device=task_vectors.device)
    u_all = torch.empty((m, r), **like)
    s_all = torch.empty(r, **like)
    vh_all = torch.empty((r, n), **like)
    for t in range(n_tasks if n_t > 0 else 0):
        tau = task_vectors[t]
        residual = tau - u_c @ (u_c.T @ tau)
        u_t, s_t, vh_t = svd(residual)
        block = slice(t * n_t, (t + 1) * n_t)
        u_all[:, block] = u_t[:, :n_t]
        s_all[block] = s_t[:n_t]
        vh_all[block] = vh_t[:n_t]
    common = slice(n_tasks * n_t, r)
    u_all[:, common] = u_c
    s_all[common] = s_c
    vh_all[common] = vh_c
    return s_all.mean() * (polar(u_all) @ polar(vh_all))


def iso_cts_delta(
    task_vectors: torch.Tensor, common_fraction: float, task_sum: torch.Tensor | None = None
) -> torch.Tensor:
    """Unscaled `delta` of any merged tensor `[N, *shape]`: Iso-CTS for matrices, the mean
    otherwise. `task_sum` is `sum_tasks(task_vectors)` when already computed."""
    if task_sum is None:
        task_sum = sum_tasks(task_vectors)
    if is_matrix(task_vectors):
        return iso_cts_matrix(task_vectors, common_fraction, task_sum)
    return task_sum / task_vectors.shape[0]


class IsoCTS(TaskVectorMethod):
    name = "iso_cts"
    post_scaling = "scaling"

    scaling: float = option(number)
    common_fraction: float = option(fraction, low_open=False)

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return self.scaling * iso_cts_delta(task_vectors, self.common_fraction)

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        # The stream has already summed the task vectors (task order) for its checks.
        return self.scaling * iso_cts_delta(
            item.task_vectors, self.common_fraction, item.task_sum()
        )
