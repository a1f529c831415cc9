"""Building the zoo: fine-tune whatever part of a family's zoo is missing or stale (one model
per task and the multi-task model), in this process or in the worker pool, and record each
model in `zoo.json` as it finishes."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergebench.families import ZooFamily, embedded_family, family_class
from mergebench.sources.zoo.job import train_model
from mergebench.sources.zoo.manifest import (
    family_dir,
    multitask_signature,
    read_manifest,
    save_atomic,
    task_signature,
    write_manifest,
)
from mergebench.sources.zoo.settings import finetune_settings
from mergebench.sources.zoo.workers import train_in_processes, zoo_workers
from mergebench.util.config import to_plain as _plain
from mergebench.util.machine import busy_machine_advice


def set_threads(threads: int | None) -> None:
    """Fix torch's CPU threads (`threads` config key); None keeps torch's default (all cores)."""
    if threads:
        torch.set_num_threads(int(threads))
    # On a terminal only: captured stderr (tests, scripts parsing our one-line errors) stays
    # one line per error.
    advice = busy_machine_advice(threads)
    if advice and sys.stderr.isatty():
        print(advice, file=sys.stderr, flush=True)


def ensure_zoo(
    cfg: Mapping[str, Any],
    progress: bool = True,
    force: bool = False,
    multitask: bool | None = None,
) -> Path:
    """Build whatever part of the zoo for `cfg`'s family and task set is missing or stale;
    return the family's zoo folder. `cfg` holds `model`, `taskset`, `seed` and `zoo`.

    A family that trains on a fixed number of threads (`model.finetune.threads`, e.g. the
    vision set's 1) trains its models side by side in `zoo.workers` processes (default:
    as many as the cores hold); each model is the same bit for bit as when trained alone."""
    from filelock import FileLock

    # Only what the zoo reads (plain data, so worker processes can take it).
    cfg = {k: _plain(cfg.get(k)) for k in ("model", "taskset", "seed", "zoo", "threads")}
    cfg_model, cfg_taskset = cfg["model"], cfg["taskset"]
    family_class(cfg_model, ZooFamily)  # a model with configured checkpoints has no zoo
    seed = int(cfg.get("seed", 0))
    zoo_cfg = cfg.get("zoo") or {}
    with_multitask = bool(zoo_cfg.get("multitask", True)) if multitask is None else multitask
    hp = finetune_settings(cfg_model)
    zoo_workers(zoo_cfg, hp, jobs=1)  # a bad `zoo.workers` fails before anything is written
    directory = family_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    family, data = embedded_family(cfg_model, cfg_taskset, seed)
    set_threads(cfg.get("threads"))

    with FileLock(str(directory / ".lock")):
        manifest = read_manifest(directory)
        pre = directory / "pretrained.safetensors"
        if force or not pre.exists():
            save_atomic(family.pretrained_state(), pre)
        manifest["family"] = cfg_model["name"]
        manifest["pretrained"] = {"file": pre.name, "source": type(family).__module__}

        tasks = list(data.tasks)
        jobs: list[str | None] = []  # task names to train; None: the multi-task model
        for task in tasks:
            sig = task_signature(cfg_model, hp, seed, task, data.fingerprint(task))
            entry = manifest["tasks"].get(task, {})
            if (
                force
                or entry.get("signature") != sig
                or not (directory / f"{task}.safetensors").exists()
            ):
                jobs.append(task)
        taskset = str(cfg_taskset.get("name", "custom"))
        if with_multitask:
            entry = manifest["multitask"].get(taskset, {})
            folder = directory / "multitask" / taskset
            if (
                force
                or entry.get("signature") != multitask_signature(cfg_model, hp, seed, data)
                or not (folder / "backbone.safetensors").exists()
            ):
                jobs.append(None)
        workers = zoo_workers(zoo_cfg, hp, len(jobs))
        labels = {
            job: f"[{tasks.index(job) + 1}/{len(tasks)}] " if job is not None else ""
            for job in jobs
        }

        def record(job: str | None, entry: dict[str, Any]) -> None:
            if job is None:
                manifest["multitask"][taskset] = entry
            else:
                manifest["tasks"][job] = entry
            write_manifest(directory, manifest)

        if workers == 1:
            for job in jobs:
                record(
                    job, train_model(directory, cfg, hp, family, data, job, labels[job], progress)
                )
        else:
            train_in_processes(cfg, hp, data, jobs, labels, workers, record)
        write_manifest(directory, manifest)
    return directory
