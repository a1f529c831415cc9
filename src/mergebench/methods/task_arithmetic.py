"""Task Arithmetic: `W = W_pre + lam * sum_t tau_t`."""

from __future__ import annotations

import torch

from mergebench.engine.stream import TensorItem, sum_tasks
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.options import number, option


class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    post_scaling = "scaling"

    scaling: float = option(number)

    def splits_rows(self) -> bool:
        return True  # entry by entry

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return self.scaling * sum_tasks(task_vectors)

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        # The stream has already summed the task vectors (task order) for its checks.
        return self.scaling * item.task_sum()
