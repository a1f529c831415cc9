"""Iso-C (isotropic merge in the common subspace): `W = W_pre + scaling * delta` (methods.md).

Per matrix: `S = sum_t tau_t = U diag(s) V^T` (thin SVD, task sum in task order),
`delta = mean(s) * U V^T` with the mean over all `min(m, n)` singular values. Every other
tensor: `delta = mean_t tau_t`.

`U V^T` is the polar factor of `S`: unique when `S` has full rank (task vectors of real
models do). A rank-deficient `S` leaves `U V^T` free on its null spaces, so the result
there depends on the SVD library's choice of basis, as in the official code.
"""

from __future__ import annotations

import torch

from mergebench.engine.stream import TensorItem, sum_tasks
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.options import number, option
from mergebench.methods.svd_utils import is_matrix, svd


def iso_c_matrix(task_sum: torch.Tensor) -> torch.Tensor:
    """Iso-C's unscaled `delta` of one matrix from its task sum `S` (`m x n`)."""
    u, s, vh = svd(task_sum)
    return s.mean() * (u @ vh)


def iso_c_delta(task_vectors: torch.Tensor, task_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Unscaled `delta` of any merged tensor `[N, *shape]`: Iso-C for matrices, the mean
    otherwise. `task_sum` is `sum_tasks(task_vectors)` when already computed."""
    if task_sum is None:
        task_sum = sum_tasks(task_vectors)
    if is_matrix(task_vectors):
        return iso_c_matrix(task_sum)
    return task_sum / task_vectors.shape[0]


class IsoC(TaskVectorMethod):
    name = "iso_c"
    post_scaling = "scaling"

    scaling: float = option(number)

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return self.scaling * iso_c_delta(task_vectors)

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        # The stream has already summed the task vectors (task order) for its checks.
        return self.scaling * iso_c_delta(item.task_vectors, item.task_sum())
