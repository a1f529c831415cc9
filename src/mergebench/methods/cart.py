"""CART (centered arithmetic with low-rank task vectors around the average) (methods.md).

`W_avg = W_pre + mean_t tau_t` for every tensor. Per matrix (`m x n`): the centred task
vectors `delta_t = W_t - W_avg = tau_t - mean_t tau_t`, each truncated to its rank
`k = max(1, floor(rank_ratio * min(m, n)))` SVD, and
`W = W_avg + scaling * sum_t delta_t'` (sum in task order). Every other tensor keeps
`W_avg` (its centred vectors sum to zero).

The streamed engine adds one `delta` to `W_pre`: `delta = mean + scaling * sum_t delta_t'`.
"""

from __future__ import annotations

import math

import torch

from mergebench.engine.stream import TensorItem, sum_tasks
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.options import fraction, number, option
from mergebench.methods.svd_utils import is_matrix, truncate


def cart_rank(rank_ratio: float, m: int, n: int) -> int:
    """`k = max(1, floor(rank_ratio * min(m, n)))`."""
    return max(1, math.floor(rank_ratio * min(m, n)))


def cart_delta(
    task_vectors: torch.Tensor,
    rank_ratio: float,
    scaling: float,
    task_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """`W - W_pre` of any merged tensor `[N, *shape]` (scaling included: it only scales the
    low-rank part). `task_sum` is `sum_tasks(task_vectors)` when already computed."""
    if task_sum is None:
        task_sum = sum_tasks(task_vectors)
    mean = task_sum / task_vectors.shape[0]
    if not is_matrix(task_vectors):
        return mean
    n_tasks, m, n = task_vectors.shape
    k = cart_rank(rank_ratio, m, n)
    total = torch.zeros_like(mean)
    for t in range(n_tasks):  # task order
        total += truncate(task_vectors[t] - mean, k)
    return mean + scaling * total


class CART(TaskVectorMethod):
    name = "cart"

    rank_ratio: float = option(fraction)  # (0, 1]
    scaling: float = option(number)

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return cart_delta(task_vectors, self.rank_ratio, self.scaling)

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        # The stream has already summed the task vectors (task order) for its checks.
        return cart_delta(item.task_vectors, self.rank_ratio, self.scaling, item.task_sum())
