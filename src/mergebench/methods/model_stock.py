"""Model Stock (Jang et al. 2024), as mergekit's `model_stock` computes it (methods.md).

Per merged tensor, the offsets are the task vectors `o_t = W_t - W_pre`, flattened into one
row (`filter_wise`: rows along the last dimension, a 1-D tensor one row, a 0-D tensor one
row of one entry: mergekit's `dim=-1`). Per row and pair `i < j`:
`cos_ij = clamp(o_i . o_j / max(||o_i|| ||o_j||, 1e-6), -1, 1)`; `c` = their mean;
`t = N c / (1 + (N - 1) c)`; `W = t * mean_t W_t + (1 - t) * W_pre`, computed as
`W_pre + t * mean_t tau_t` (within 1-2 ulp). The dot products are float64 sums.

`1 + (N - 1) c` is 0 when the unit offsets cancel (two tasks moving a one-entry row in
opposite directions) and `t` has no finite value: where `|1 + (N - 1) c| < 1e-6` mergekit
0.1.5 takes `t = 0` (the row stays `W_pre`; earlier releases wrote inf/nan), and so do we.
"""

from __future__ import annotations

import math

import torch

from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TensorItem, sum_tasks
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.options import flag, option
from mergebench.util.errors import MergeBenchError

# Entries per float64 block of the Gram sums: no float64 copy of a whole (LLM-sized) tensor.
_BLOCK = 1 << 16
# mergekit's floor on `||o_i|| ||o_j||`: a zero offset gets cosine 0, not 0/0.
NORM_PRODUCT_FLOOR = 1e-6
# mergekit 0.1.5: a denominator `1 + (N - 1) c` below this in size gives `t = 0`.
SINGULAR_DENOMINATOR = 1e-6


def rows_view(stack: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """`[N, *shape]` as `[N, rows, entries]`: one row, or rows along the last dimension."""
    n, shape = stack.shape[0], stack.shape[1:]
    if not filter_wise or len(shape) == 0:
        return stack.reshape(n, 1, math.prod(shape))
    return stack.reshape(n, math.prod(shape[:-1]), shape[-1])


def row_gram(rows: torch.Tensor) -> torch.Tensor:
    """`G[r, i, j] = sum_e rows[i, r, e] * rows[j, r, e]` in float64, block by block."""
    n, count, width = rows.shape
    gram = torch.zeros((count, n, n), dtype=torch.float64, device=rows.device)
    if count == 0 or width == 0:
        return gram
    row_step = max(1, _BLOCK // width)
    col_step = min(width, _BLOCK)
    for r in range(0, count, row_step):
        for c in range(0, width, col_step):
            block = rows[:, r : r + row_step, c : c + col_step].to(torch.float64)
            block = block.transpose(0, 1)  # [rows, N, entries]
            gram[r : r + row_step] += block @ block.transpose(1, 2)
    return gram


def stock_ratio(gram: torch.Tensor) -> torch.Tensor:
    """Per row, `t = N c / (1 + (N - 1) c)` from the offsets' Gram matrices `[rows, N, N]`
    (float64); 0 where `|1 + (N - 1) c| < 1e-6`."""
    n = gram.shape[-1]
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).sqrt()  # [rows, N]
    total = torch.zeros(gram.shape[0], dtype=torch.float64, device=gram.device)
    for i in range(n):
        for j in range(i + 1, n):
            floor = (norms[:, i] * norms[:, j]).clamp(min=NORM_PRODUCT_FLOOR)
            total += (gram[:, i, j] / floor).clamp(-1.0, 1.0)
    cos = total / (n * (n - 1) // 2)
    denominator = 1.0 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR_DENOMINATOR
    ratio = n * cos / torch.where(singular, 1.0, denominator)
    return torch.where(singular, 0.0, ratio)


def model_stock_delta(
    task_vectors: torch.Tensor, filter_wise: bool, task_sum: torch.Tensor | None = None
) -> torch.Tensor:
    """`t * mean_t tau_t` for one key (`[N, *shape]` float32 in, `shape` float32 out)."""
    n = task_vectors.shape[0]
    rows = rows_view(task_vectors, filter_wise)
    ratio = stock_ratio(row_gram(rows)).to(torch.float32)  # [rows]
    if task_sum is None:
        task_sum = sum_tasks(task_vectors)
    mean = task_sum.reshape(rows.shape[1:]) / n
    return (ratio[:, None] * mean).reshape(task_vectors.shape[1:])


class ModelStock(TaskVectorMethod):
    name = "model_stock"

    filter_wise: bool = option(flag)

    def accept_pool(self, pool: ModelPool) -> None:
        if len(pool.tasks) < 2:
            raise MergeBenchError(
                f"{self.name}: needs at least two fine-tuned models, got {len(pool.tasks)} "
                f"({', '.join(pool.tasks)})"
            )

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return model_stock_delta(task_vectors, self.filter_wise)

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        # The stream has already summed the task vectors (task order).
        return model_stock_delta(item.task_vectors, self.filter_wise, item.task_sum())
