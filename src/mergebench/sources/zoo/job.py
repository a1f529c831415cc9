"""One zoo model: fine-tune it (a task's model, or the multi-task one), save it, score it on
validation, and return its `zoo.json` entry."""

from __future__ import annotations

import sys
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergebench.evaluation import score_model
from mergebench.families.base import HEAD, ZooFamily, head_keys
from mergebench.families.labeled import LabeledData
from mergebench.sources.zoo.manifest import multitask_signature, save_atomic, task_signature
from mergebench.sources.zoo.settings import multitask_settings, single_task_settings
from mergebench.sources.zoo.train import fit


def say(msg: str) -> None:
    print(f"[mergebench-zoo] {msg}", file=sys.stderr, flush=True)


def _metrics(
    model: torch.nn.Module, data: LabeledData, task: str, batch_size: int
) -> dict[str, dict[str, float]]:
    """Validation score, a sanity check of the fine-tune. The test split is scored once, by
    the reference rows (`mergebench-zoo` evaluates and caches them right after training)."""
    score, _ = score_model(model, data, task, "validation", batch_size)
    return {"validation": {score.metric: score.value}}


def train_model(
    directory: Path,
    cfg: Mapping[str, Any],
    hp: Mapping[str, Any],
    family: ZooFamily,
    data: LabeledData,
    job: str | None,
    label: str,
    progress: bool,
) -> dict[str, Any]:
    """Fine-tune, save and evaluate one zoo model (a task's, or the multi-task one for
    `job=None`); return its `zoo.json` entry."""
    if job is None:
        return _train_multitask(directory, cfg, hp, family, data, progress)
    cfg_model, seed, task = cfg["model"], int(cfg.get("seed", 0)), job
    sig = task_signature(cfg_model, hp, seed, task, data.fingerprint(task))
    path = directory / f"{task}.safetensors"
    say(f"{cfg_model['name']} {label}fine-tuning {task} "
        f"({data.num_examples(task, 'train')} examples, {hp['epochs']} epochs)")  # fmt: skip
    task_seed = seed * 1_000_003 + zlib.crc32(task.encode()) % 1_000_003
    models, seconds = fit(family, data, [task], hp, int(hp["epochs"]), task_seed, progress)
    model = models[task]
    metrics = _metrics(model, data, task, family.eval_batch_size)
    save_atomic(model.state_dict(), path, {"task": task, "signature": sig})
    say(f"{task}: validation {metrics['validation']} ({seconds:.0f} s)")
    return {
        "signature": sig,
        "file": path.name,
        "data_fingerprint": data.fingerprint(task),
        "seed": seed,
        "train_seed": task_seed,
        "options": cfg_model.get("options") or {},
        "finetune": single_task_settings(hp),
        "examples": {s: data.num_examples(task, s) for s in ("train", "validation", "test")},
        "metrics": metrics,
        "train_seconds": round(seconds, 2),
    }


def _train_multitask(
    directory: Path,
    cfg: Mapping[str, Any],
    hp: Mapping[str, Any],
    family: ZooFamily,
    data: LabeledData,
    progress: bool,
) -> dict[str, Any]:
    cfg_model, seed = cfg["model"], int(cfg.get("seed", 0))
    name = str(cfg["taskset"].get("name", "custom"))
    tasks = list(data.tasks)
    folder = directory / "multitask" / name
    epochs = int(hp["multitask_epochs"])
    say(f"{cfg_model['name']} multi-task model on {len(tasks)} tasks ({epochs} epochs)")
    mt_hp = multitask_settings(hp)
    models, seconds = fit(family, data, tasks, mt_hp, epochs, seed * 1_000_003 + 7, progress)
    state = models[tasks[0]].state_dict()
    save_atomic(
        {k: v for k, v in state.items() if not k.startswith(HEAD + ".")},
        folder / "backbone.safetensors",
    )
    metrics = {}
    for task in tasks:
        save_atomic(head_keys(models[task].state_dict()), folder / "heads" / f"{task}.safetensors")
        metrics[task] = _metrics(models[task], data, task, family.eval_batch_size)
    summary = ", ".join(f"{t}: {m['validation']}" for t, m in metrics.items())
    say(f"multi-task: validation {summary} ({seconds:.0f} s)")
    return {
        "signature": multitask_signature(cfg_model, hp, seed, data),
        "folder": str(folder.relative_to(directory)),
        "tasks": tasks,
        "epochs": epochs,
        "finetune": mt_hp,
        "seed": seed,
        "metrics": metrics,
        "train_seconds": round(seconds, 2),
    }
