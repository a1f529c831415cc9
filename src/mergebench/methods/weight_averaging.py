"""Weight averaging: `W = mean_t W_t` (computed as `W_pre + mean_t tau_t` in float32)."""

from __future__ import annotations

import torch

from mergebench.engine.stream import TensorItem, sum_tasks
from mergebench.methods.base import TaskVectorMethod


class WeightAveraging(TaskVectorMethod):
    name = "weight_averaging"

    def splits_rows(self) -> bool:
        return True  # entry by entry

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return sum_tasks(task_vectors) / task_vectors.shape[0]

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        # The stream has already summed the task vectors (task order) for its checks.
        return item.task_sum() / item.task_vectors.shape[0]
