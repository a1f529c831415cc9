"""The zoo's fine-tuning settings: a model config's `finetune` section, checked, and the
single-task and multi-task views of it that training and the checkpoint signatures use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergebench.util.config import to_plain as _plain
from mergebench.util.errors import MergeBenchError

# Hyperparameters a model config's `finetune` section may set (defaults in conf/model/*.yaml).
FINETUNE_KEYS = (
    "epochs", "batch_size", "lr", "head_lr", "weight_decay", "warmup",
    "max_grad_norm", "multitask_epochs", "multitask_lr", "multitask_head_lr",
)  # fmt: skip
# Optional fine-tuning settings: `threads` fixes torch's CPU threads while training (CPU
# convolutions add up in a thread-count-dependent order; a fixed count makes the zoo the
# same bit for bit on any machine). `multitask_batches`: `per_task` (default: each batch holds
# one task) or `mixed` (each batch drawn from all tasks' examples: what BatchNorm statistics
# that train need, since the model is evaluated with statistics of the mixture). `head_init`:
# `random` (default) or `probe` (LP-FT: each head starts as the logistic-regression probe of
# the frozen pretrained features, sources/zoo/probe.py).
OPTIONAL_FINETUNE_KEYS = ("threads", "multitask_batches", "head_init")
MULTITASK_BATCHES = ("per_task", "mixed")
HEAD_INITS = ("random", "probe")


def finetune_settings(cfg_model: Mapping[str, Any]) -> dict[str, Any]:
    hp = dict(_plain(cfg_model.get("finetune")) or {})
    known = FINETUNE_KEYS + OPTIONAL_FINETUNE_KEYS
    unknown = sorted(set(hp) - set(known))
    if unknown:
        raise MergeBenchError(
            f"model.finetune: unknown option {unknown[0]!r} (options: {', '.join(known)})"
        )
    missing = [k for k in FINETUNE_KEYS if k not in hp]
    if missing:
        raise MergeBenchError(f"model.finetune.{missing[0]}: missing")
    if hp.get("multitask_batches", "per_task") not in MULTITASK_BATCHES:
        raise MergeBenchError(
            f"model.finetune.multitask_batches: {hp['multitask_batches']!r} "
            f"(choose from {', '.join(MULTITASK_BATCHES)})"
        )
    if hp.get("head_init", "random") not in HEAD_INITS:
        raise MergeBenchError(
            f"model.finetune.head_init: {hp['head_init']!r} (choose from {', '.join(HEAD_INITS)})"
        )
    return hp


def single_task_settings(hp: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hp.items() if not k.startswith("multitask_")}


def multitask_settings(hp: Mapping[str, Any]) -> dict[str, Any]:
    """The single-task settings with the multi-task overrides applied."""
    out = single_task_settings(hp)
    out.update(
        epochs=hp["multitask_epochs"], lr=hp["multitask_lr"], head_lr=hp["multitask_head_lr"]
    )
    if "multitask_batches" in hp:  # only when set: older multi-task models keep their signature
        out["batches"] = hp["multitask_batches"]
    return out
