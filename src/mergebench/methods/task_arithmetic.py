"""Task Arithmetic: `W = W_pre + lam * sum_t tau_t`."""

from __future__ import annotations

import numpy as np
import torch

from mergebench.engine import kernels
from mergebench.engine.stream import TensorItem, numpy_kernels, sum_tasks
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.options import number, option


class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    post_scaling = "scaling"

    scaling: float = option(number)

    def splits_rows(self) -> bool:
        return True  # entry by entry

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        if numpy_kernels(task_vectors) and task_vectors.is_contiguous():
            # One compiled pass: the task sum (task order) times float32(scaling), as torch.
            n = task_vectors.shape[0]
            out = np.empty(task_vectors[0].numel(), dtype=np.float32)
            rows = task_vectors.reshape(n, -1).numpy()
            kernels.scaled_task_sum(rows, np.float32(self.scaling), out)
            return torch.from_numpy(out).view(task_vectors.shape[1:])
        return self.scaling * sum_tasks(task_vectors)

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        # The stream has already summed the task vectors (task order) for its checks.
        return self.scaling * item.task_sum()
