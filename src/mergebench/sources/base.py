"""Where a benchmark's checkpoints come from: one protocol, two implementations.

- `ZooSource` (`mergebench.sources.zoo`): fine-tuned here, from packaged pretrained weights
  on packaged data (the offline benchmark); has a multi-task reference model.
- `ConfiguredSource` (`mergebench.sources.configured`): hub ids or local paths named in
  `model.checkpoints` (the paper settings).

The benchmark job only talks to this protocol: the family and its labeled data, the pool
that methods merge, a signature of the checkpoints and data (it keys cached reference rows
and the results store), and the reference rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from mergebench.engine.pool import ModelPool
from mergebench.families.base import Family
from mergebench.families.labeled import LabeledData


class PerTaskModels(Protocol):
    """Anything the evaluator can score: a full state dict per task."""

    def state_dict(self, task: str) -> dict[str, torch.Tensor]: ...


class CheckpointSource(Protocol):
    family: Family
    data: LabeledData

    def signature(self) -> str:
        """Identity of the checkpoints and data: equal signatures, equal results."""
        ...

    def cache_dir(self) -> Path:
        """Where this source caches what it derives (reference rows)."""
        ...

    def pool(self) -> ModelPool:
        """The pretrained and fine-tuned checkpoints, with the family's unlabeled data."""
        ...

    def reference_kinds(self) -> tuple[str, ...]:
        """The reference rows this source has, in `REFERENCE_ROWS` order."""
        ...

    def reference(self, kind: str) -> PerTaskModels:
        """The models of one reference row."""
        ...
