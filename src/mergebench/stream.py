"""Tensor-by-tensor iteration over a pool: the one place that knows about keys, dtype and I/O.

Every data-free method is a per-tensor function of `(pretrained, task vectors [N, ...])`.
`TaskVectorStream` reads one key at a time from every checkpoint (memory-mapped where the
format allows), checks it is finite, and hands float32 tensors to the method. Methods that
need a global statistic (TIES global top-k, EMR's global rescaler) make several passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mergebench.errors import MergeBenchError
from mergebench.pool import ModelPool
from mergebench.selection import KeyPlan, plan_keys

# A transform rewrites the task vectors of one key (DARE's drop-and-rescale). A factory makes
# a fresh one per pass so that random transforms replay identically in every pass.
TaskVectorTransform = Callable[[str, torch.Tensor], torch.Tensor]
TransformFactory = Callable[[], TaskVectorTransform]


@dataclass
class TensorItem:
    key: str
    pretrained: torch.Tensor  # float32
    task_vectors: torch.Tensor  # float32, [N, *shape]
    dtype: torch.dtype  # the pretrained storage dtype, for writing back


def load_float(source, key: str) -> torch.Tensor:
    tensor = source.get(key)
    if not torch.isfinite(tensor).all():
        raise MergeBenchError(f"{source.name}: tensor {key!r} has non-finite values (nan/inf)")
    return tensor.to(torch.float32)


class TaskVectorStream:
    """Passes over the merged keys of a pool, one tensor at a time."""

    def __init__(
        self,
        pool: ModelPool,
        plan: KeyPlan | None = None,
        transform_factory: TransformFactory | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        self.pool = pool
        self.plan = plan if plan is not None else plan_keys(pool)
        self.transform_factory = transform_factory
        self.device = torch.device(device)
        self.progress = progress

    @property
    def tasks(self) -> list[str]:
        return self.pool.tasks

    def numel(self, key: str) -> int:
        return self.pool.pretrained.numel(key)

    def passes(self, description: str = "merging") -> Iterator[TensorItem]:
        """One full pass; each call starts afresh (and replays random transforms)."""
        transform = self.transform_factory() if self.transform_factory else None
        keys = self.plan.merged
        for key in tqdm(keys, desc=description, unit="tensor", disable=not self.progress or None,
                        leave=False):
            pre = load_float(self.pool.pretrained, key).to(self.device)
            taus = torch.stack(
                [load_float(ft, key).to(self.device) - pre for ft in self.pool.finetuned.values()]
            )
            if transform is not None:
                taus = transform(key, taus)
            yield TensorItem(key, pre, taus, self.pool.pretrained.dtype(key))
