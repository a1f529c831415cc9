"""Shared fixtures: tiny hand-made models; everything offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def vector_pool(task_vectors: dict[str, list[float]], key: str = "w") -> tuple[dict, dict]:
    """A pretrained model of zeros plus one fine-tuned model per task: W_t = tau_t."""
    first = next(iter(task_vectors.values()))
    pre = {key: torch.zeros(len(first))}
    finetuned = {t: {key: torch.tensor(v, dtype=torch.float32)} for t, v in task_vectors.items()}
    return pre, finetuned


@pytest.fixture
def tiny_models() -> tuple[dict, dict]:
    """Pretrained + three fine-tuned models with a head, an integer buffer and two layers."""
    g = torch.Generator().manual_seed(0)
    pre = {
        "layer.weight": torch.randn(6, 5, generator=g),
        "layer.bias": torch.randn(6, generator=g),
        "out.weight": torch.randn(4, 6, generator=g),
        "position_ids": torch.arange(7),
        "classifier.weight": torch.randn(3, 4, generator=g),
    }
    finetuned = {}
    for index, task in enumerate(["a", "b", "c"]):
        ft = {k: v.clone() for k, v in pre.items()}
        for k in ("layer.weight", "layer.bias", "out.weight"):
            ft[k] = ft[k] + 0.1 * torch.randn(ft[k].shape, generator=g)
        ft["classifier.weight"] = torch.randn(2 + index, 4, generator=g)  # own head size
        finetuned[task] = ft
    return pre, finetuned
