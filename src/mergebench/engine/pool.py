"""The model pool: one model family, one task set, its checkpoints, and (optionally) its data.

Methods receive a pool. Data-free methods only read checkpoints (`pretrained`, `finetuned`,
`exclude`). Data-dependent methods additionally call `build_model`, `logits` and
`unlabeled_inputs`; the pool never hands a method a label, so no method can read one.
The evaluator is the only caller of `labeled_test_set`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from mergebench.engine.align import align_checkpoints
from mergebench.engine.checkpoints import CheckpointLike, TensorReader, open_checkpoint
from mergebench.util.errors import MergeBenchError

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
Batch = Mapping[str, torch.Tensor]


@runtime_checkable
class TaskFamily(Protocol):
    """What a model family with data offers (the embedded zoo, CLIP, RoBERTa, GPT-2 ...)."""

    def build_model(self, task: str) -> nn.Module:
        """A runnable model for `task` (its head shape); weights are loaded by the caller."""

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Forward one batch of inputs (no labels inside) to `[batch, classes]` logits."""

    def unlabeled_inputs(
        self, task: str, split: Split, max_examples: int | None, batch_size: int
    ) -> Iterable[Batch]:
        """Batches of inputs only. Implementations must strip labels at the source."""


@dataclass
class ModelPool:
    """Checkpoints of one family and task set, plus the family's data access if it has any."""

    pretrained: TensorReader
    finetuned: dict[str, TensorReader]
    exclude: list[str] = field(default_factory=list)
    # CLIP zero-shot: heads come from text prompts, so a task may lack the excluded keys.
    heads_separate: bool = False
    # `auto`: keys some model lacks or holds in another shape stay each task's own (keyplan).
    task_specific: str = "exclude"
    family: TaskFamily | None = None
    name: str = "custom"
    # The family's block regex (one group: the block number), for layer-wise methods (LiNeS).
    layer_pattern: str | None = None
    # {checkpoint: {"rules": {from: to}, "how": ...}}: checkpoints seen under renamed keys.
    key_alignment: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.finetuned)

    def require_family(self, method: str) -> TaskFamily:
        if self.family is None:
            raise MergeBenchError(
                f"method {method!r} needs data, but pool {self.name!r} has no model family with "
                "data (use a configured family such as model=minilm)"
            )
        return self.family

    @classmethod
    def from_checkpoints(
        cls,
        pretrained: CheckpointLike,
        finetuned: Mapping[str, CheckpointLike],
        exclude: Iterable[str] = (),
        heads_separate: bool = False,
        family: Any = None,
        name: str = "custom",
        layer_pattern: str | None = None,
        key_map: Any = None,
        strip_prefix: Any = None,
        task_specific: str = "exclude",
    ) -> ModelPool:
        """The pool over opened checkpoints, each fine-tuned one seen under the pretrained
        model's key names (a detected prefix, or `key_map`/`strip_prefix`: see align.py)."""
        if not finetuned:
            raise MergeBenchError("finetuned: at least one fine-tuned model is needed")
        exclude = list(exclude)
        pre, tuned, alignment = align_checkpoints(
            open_checkpoint(pretrained, role="pretrained"),
            {str(t): open_checkpoint(c, role=f"finetuned[{t}]") for t, c in finetuned.items()},
            exclude,
            key_map=key_map,
            strip_prefix=strip_prefix,
        )
        return cls(
            pretrained=pre,
            finetuned=tuned,
            key_alignment=alignment,
            exclude=exclude,
            heads_separate=heads_separate,
            task_specific=task_specific,
            family=family,
            name=name,
            layer_pattern=layer_pattern,
        )
