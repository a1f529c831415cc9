"""The random pool of the SVD-method tests (tsv, iso, cart, wudi): pretrained tensors of the
given shapes, task vectors of size `scale`, an integer `position_ids` buffer copied as is,
and a task-specific `head.weight` whose shape differs per task."""

from __future__ import annotations

import torch


def random_pool(
    shapes: dict[str, tuple[int, ...]], seed: int = 0, num_tasks: int = 3, scale: float = 0.1
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    pre = {
        key: torch.arange(shape[0]) if key == "position_ids" else torch.randn(shape, generator=g)
        for key, shape in shapes.items()
    }
    finetuned = {}
    for t in range(num_tasks):
        ft = {}
        for key, value in pre.items():
            if value.is_floating_point():
                ft[key] = value + scale * torch.randn(value.shape, generator=g)
            else:
                ft[key] = value.clone()
        ft["head.weight"] = torch.randn(2 + t, 4, generator=g)
        finetuned[f"task{t}"] = ft
    return pre, finetuned
