"""Weight averaging: `W = mean_t W_t` (computed as `W_pre + mean_t tau_t` in float32)."""

from __future__ import annotations

import torch

from mergebench.methods.base import TaskVectorMethod


class WeightAveraging(TaskVectorMethod):
    name = "weight_averaging"

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return task_vectors.mean(dim=0)
