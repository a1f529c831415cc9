"""Consensus merging: keep the entries of `tau_MTL` that at least `k` TALL masks keep.

`c = (sum_t m_t >= k)` with the TALL masks `m_t = |tau_t| > threshold_t * |tau_MTL - tau_t|`
(`methods/tall_masks.py`, same `base` and `threshold` options), and
`W = W_pre + scaling * (c * tau_MTL)` (methods.md). `k = 0` gives the base method (with
`scaling`), `k > N` gives `W_pre`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergebench.engine.stream import TaskVectorStream, TensorItem
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.options import choice, integer, number, option
from mergebench.methods.tall_masks import (
    BASES,
    Threshold,
    multitask_vector,
    parse_threshold,
    prepare_base,
    tall_masks,
    task_thresholds,
)
from mergebench.methods.ties import Ties


def consensus_vector(
    task_vectors: torch.Tensor,
    multitask: torch.Tensor,
    thresholds: Sequence[float],
    k: int,
) -> torch.Tensor:
    """`c * tau_MTL` with `c = (number of TALL masks keeping the entry >= k)`."""
    votes = tall_masks(task_vectors, multitask, thresholds).sum(dim=0)
    return multitask * (votes >= k)


class Consensus(TaskVectorMethod):
    name = "consensus"
    post_scaling = "scaling"

    base: str = option(choice, allowed=BASES)
    threshold: Threshold = option(parse_threshold, record_checked=True)
    k: int = option(integer, minimum=0)
    scaling: float = option(number)

    def setup(self) -> None:
        self._thresholds: list[float] | None = None
        self._ties: Ties | None = None

    def prepare(self, stream: TaskVectorStream) -> None:
        self._thresholds = task_thresholds(self.name, self.threshold, stream.tasks)
        self._ties = prepare_base(self.base, stream)

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        return self._merge(item.key, item.task_vectors, item.task_sum())

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return self._merge(key, task_vectors, None)

    def _merge(
        self, key: str, task_vectors: torch.Tensor, task_sum: torch.Tensor | None
    ) -> torch.Tensor:
        assert self._thresholds is not None, "prepare() sets the thresholds"
        multitask = multitask_vector(key, task_vectors, self.base, self._ties, task_sum)
        return self.scaling * consensus_vector(task_vectors, multitask, self._thresholds, self.k)
