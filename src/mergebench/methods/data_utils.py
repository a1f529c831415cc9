"""What data-dependent methods (RegMean, Fisher, AdaMerging) share: a label-free door to data.

A method never holds the pool's family itself. It holds an `InputsOnly` view that offers
exactly three things: build a task's model, turn a batch of inputs into logits, and iterate
unlabeled inputs of a split. Anything else a family object may carry (a labeled accessor for
the evaluator, the raw data set) is out of reach, and a batch that carries a label-like key
is refused, so a family bug cannot leak labels into a merge either.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mergebench.engine.keyplan import compile_patterns, is_excluded
from mergebench.engine.pool import SPLITS, Batch, ModelPool, Split, TaskFamily
from mergebench.util.errors import MergeBenchError

# Keys that would mean a family handed labels to a merging method.
LABEL_KEYS = frozenset({"label", "labels", "label_ids", "target", "targets", "y"})


class InputsOnly:
    """The only access to data a merging method gets: models, logits, unlabeled inputs."""

    __slots__ = ("_family", "_method", "_pool_name")

    def __init__(self, family: TaskFamily, method: str, pool_name: str) -> None:
        self._family = family
        self._method = method
        self._pool_name = pool_name

    def build_model(self, task: str) -> nn.Module:
        return self._family.build_model(task)

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        out = self._family.logits(model, batch)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise MergeBenchError(
                f"{self._method}: family of pool {self._pool_name!r} returned logits {shape}, "
                "expected a [batch, classes] tensor"
            )
        return out

    def batches(
        self,
        task: str,
        split: Split,
        max_examples: int | None,
        batch_size: int,
        device: torch.device,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of inputs of one split, moved to `device`; label-like keys are refused."""
        if split not in SPLITS:
            raise MergeBenchError(f"{self._method}: unknown split {split!r} (choose from {SPLITS})")
        for batch in self._family.unlabeled_inputs(task, split, max_examples, batch_size):
            yield self._checked(task, batch, device)

    def _checked(self, task: str, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        if not isinstance(batch, Mapping):
            raise MergeBenchError(
                f"{self._method}: family of pool {self._pool_name!r} yielded a "
                f"{type(batch).__name__} for task {task!r}; expected a mapping of input tensors"
            )
        leaked = sorted(LABEL_KEYS.intersection(k.lower() for k in batch))
        if leaked:
            raise MergeBenchError(
                f"{self._method}: family of pool {self._pool_name!r} yielded key {leaked[0]!r} "
                f"for task {task!r}; merging methods must never receive labels"
            )
        out = {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                raise MergeBenchError(
                    f"{self._method}: input {key!r} of task {task!r} is "
                    f"{type(value).__name__}, expected a tensor"
                )
            out[key] = value.to(device)
        return out


def inputs_only(pool: ModelPool, method: str) -> InputsOnly:
    """The label-free view of the pool's family (a clear error if the pool has none)."""
    return InputsOnly(pool.require_family(method), method, pool.name)


def batch_size_of(batch: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def cycle_batches(
    data: InputsOnly,
    task: str,
    split: Split,
    max_examples: int | None,
    batch_size: int,
    device: torch.device,
    method: str,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of one split (restarting at its end), as AdaMerging's loop needs."""
    while True:
        empty = True
        for batch in data.batches(task, split, max_examples, batch_size, device):
            empty = False
            yield batch
        if empty:
            raise MergeBenchError(f"{method}: task {task!r} has no {split} inputs")


def load_task_model(
    pool: ModelPool, data: InputsOnly, task: str, device: torch.device, method: str
) -> nn.Module:
    """Task `task`'s fine-tuned model (its own head included), in eval mode on `device`."""
    model = data.build_model(task)
    state = pool.finetuned[task].state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise MergeBenchError(
            f"{method}: key {unexpected[0]!r} of {pool.finetuned[task].name} is not in the "
            f"model that the family builds for task {task!r}"
        )
    patterns = compile_patterns(pool.exclude)
    # CLIP-style families build heads themselves, so a checkpoint may lack them.
    unloaded = [k for k in missing if not (pool.heads_separate and is_excluded(k, patterns))]
    if unloaded:
        raise MergeBenchError(
            f"{method}: {pool.finetuned[task].name} lacks key {unloaded[0]!r} that the "
            f"family's model for task {task!r} needs"
        )
    return model.to(device).eval()
