"""EMR-Merging: Elect a unified task vector, then per-task Masks and Rescalers (methods.md).

Elect, per entry: `gamma = sgn(sum_t tau_t)`, `eps = max |tau_t|` over the tasks whose
`tau_t` agrees with `gamma` (0 if none), `tau_uni = gamma * eps`. Ablations: `elect=false`
uses the plain mean of the task vectors, `mask=false` uses `M_t = 1`, `rescale=false`
uses `lam_t = 1`.
"""

from __future__ import annotations

from typing import Any

import torch

from mergebench.methods.base import Method, choice, flag
from mergebench.methods.modulators import RESCALERS, UnifiedItem, mask_and_rescale
from mergebench.pool import ModelPool
from mergebench.results import TaskConditionedResult
from mergebench.selection import plan_keys
from mergebench.stream import TaskVectorStream


def elect(task_vectors: torch.Tensor, task_sum: torch.Tensor | None = None) -> torch.Tensor:
    """`tau_uni = gamma * eps` with `gamma = sgn(sum_t tau_t)`, `eps` the largest agreeing |tau_t|.

    Computed without `[N, ...]` temporaries: where gamma = +1 (sum > 0) some tau_t is
    positive and `tau_uni = max_t tau_t`; where gamma = -1, `tau_uni = min_t tau_t` if that
    is negative, else no task agrees and `tau_uni = -1 * 0 = -0.0` (bit for bit the formula).
    """
    total = task_vectors.sum(dim=0) if task_sum is None else task_sum
    high = task_vectors.amax(dim=0)
    low = task_vectors.amin(dim=0)
    return torch.where(total > 0, high, torch.where(low < 0, low, -0.0))


class EMR(Method):
    name = "emr"
    task_conditioned = True

    def __init__(self, elect: Any, mask: Any, rescale: Any, rescaler: str) -> None:
        super().__init__(elect=elect, mask=mask, rescale=rescale, rescaler=rescaler)
        self.elect = flag(self.name, "elect", elect)
        self.mask = flag(self.name, "mask", mask)
        self.rescale = flag(self.name, "rescale", rescale)
        self.rescaler = choice(self.name, "rescaler", rescaler, RESCALERS)

    def unify(
        self, task_vectors: torch.Tensor, task_sum: torch.Tensor | None = None
    ) -> torch.Tensor:
        return elect(task_vectors, task_sum) if self.elect else task_vectors.mean(dim=0)

    def merge(self, pool: ModelPool) -> TaskConditionedResult:
        stream = TaskVectorStream(pool, plan_keys(pool), device=self.device, progress=self.progress)
        items = (
            UnifiedItem(item.key, item.task_vectors, self.unify(item.task_vectors, item.task_sum()))
            for item in stream.passes(self.name, reuse_buffers=True)
        )
        return mask_and_rescale(
            self, pool, stream.plan, items, self.mask, self.rescale, self.rescaler
        )
