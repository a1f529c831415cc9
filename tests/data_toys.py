"""Tiny model families with synthetic inputs for the data-dependent methods' tests.

A family here implements `mergebench.engine.pool.TaskFamily` only: inputs per task and split, no
labels (the no-label test adds a data set that raises when a label is read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from mergebench.engine.pool import ModelPool

HEAD = [r"classifier\..*"]


class MLP(nn.Module):
    """x -> layer -> tanh -> norm -> out -> tanh -> classifier (the task head)."""

    def __init__(self, dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.out(self.norm(torch.tanh(self.layer(x))))
        return self.classifier(torch.tanh(hidden))


class ToyFamily:
    """Inputs `x` per task and split, and a model factory; nothing else."""

    def __init__(
        self,
        inputs: dict[str, dict[str, torch.Tensor]],
        make_model: Callable[[str], nn.Module],
        extra: dict[str, dict[str, dict[str, torch.Tensor]]] | None = None,
    ) -> None:
        self.inputs = inputs
        self.make_model = make_model
        self.extra = extra or {}  # task -> split -> other input tensors (attention_mask)
        self.requests: list[tuple[str, str]] = []

    def build_model(self, task: str) -> nn.Module:
        return self.make_model(task)

    def logits(self, model: nn.Module, batch) -> torch.Tensor:
        if "attention_mask" in batch:
            return model(batch["x"], batch["attention_mask"])
        return model(batch["x"])

    def unlabeled_inputs(
        self, task: str, split: str, max_examples: int | None, batch_size: int
    ) -> Iterator[dict[str, torch.Tensor]]:
        self.requests.append((task, split))
        x = self.inputs[task][split]
        n = len(x) if max_examples is None else min(max_examples, len(x))
        others = self.extra.get(task, {}).get(split, {})
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield {"x": x[start:stop], **{k: v[start:stop] for k, v in others.items()}}


def perturbed(state: dict[str, torch.Tensor], scale: float, g: torch.Generator) -> dict:
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def mlp_pool(
    tasks: tuple[str, ...] = ("a", "b"),
    dim: int = 5,
    hidden: int = 6,
    classes: tuple[int, ...] = (3, 4),
    examples: int = 24,
    seed: int = 0,
    family_cls: type = ToyFamily,
) -> tuple[ModelPool, ToyFamily]:
    """A pretrained MLP and one perturbed copy per task with its own head size."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sizes = dict(zip(tasks, classes, strict=True))
    pre_model = MLP(dim, hidden, 2)
    pre = {k: v.detach().clone() for k, v in pre_model.state_dict().items()}
    finetuned = {}
    for task in tasks:
        body = perturbed({k: v for k, v in pre.items() if not k.startswith("classifier")}, 0.2, g)
        head = MLP(dim, hidden, sizes[task]).classifier
        body.update({f"classifier.{k}": v.detach().clone() for k, v in head.state_dict().items()})
        finetuned[task] = body
    inputs = {
        task: {
            split: torch.randn(examples, dim, generator=g) + i
            for split in ("train", "validation", "test")
        }
        for i, task in enumerate(tasks)
    }
    family = family_cls(inputs, lambda task: MLP(dim, hidden, sizes[task]))
    pool = ModelPool.from_checkpoints(pre, finetuned, exclude=HEAD, family=family, name="toy")
    return pool, family
