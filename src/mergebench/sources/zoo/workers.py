"""The zoo's worker pool: train several zoo models side by side in fresh processes, each the
same bit for bit as when trained alone (a family that fixes its training threads)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from mergebench.families import embedded_family
from mergebench.families.labeled import LabeledData
from mergebench.sources.zoo.job import say, train_model
from mergebench.sources.zoo.manifest import family_dir
from mergebench.sources.zoo.settings import finetune_settings
from mergebench.util.errors import MergeBenchError


def zoo_workers(zoo_cfg: Mapping[str, Any], hp: Mapping[str, Any], jobs: int) -> int:
    """Processes that train the zoo's models side by side: `zoo.workers`, or (null) as many
    as the cores hold at the family's fixed training threads; 1 when training threads are
    not fixed (torch then uses every core for one model already)."""
    workers = check_workers(zoo_cfg.get("workers"))
    if workers is None:
        if not hp.get("threads"):
            return 1
        workers = max(1, (os.cpu_count() or 1) // int(hp["threads"]))
    return max(1, min(workers, jobs))


def check_workers(workers: Any) -> int | None:
    """`zoo.workers`: a positive integer, or null (as many as the cores hold)."""
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise MergeBenchError(f"zoo.workers: {workers!r} (a positive integer, or null)")
    return workers


def train_in_processes(
    cfg: Mapping[str, Any],
    hp: Mapping[str, Any],
    data: LabeledData,
    jobs: list[str | None],
    labels: Mapping[str | None, str],
    workers: int,
    record: Callable[[str | None, dict[str, Any]], None],
) -> None:
    """Train `jobs` in `workers` fresh processes, longest first (the multi-task model, then
    tasks by training examples); `record` each model as it finishes."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    order = sorted(
        jobs, key=lambda j: (j is not None, 0 if j is None else -data.num_examples(j, "train"))
    )
    say(f"{cfg['model']['name']}: training {len(jobs)} models in {workers} processes")
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        # Each worker's share of the cores (the family's fixed training threads if it has them).
        threads = int(hp.get("threads") or 0) or max(1, (os.cpu_count() or 1) // workers)
        pending = {pool.submit(_train_job, cfg, job, labels[job], threads): job for job in order}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                job = pending.pop(future)
                try:
                    record(job, future.result())
                except BaseException:
                    for other in pending:
                        other.cancel()
                    raise


def _train_job(cfg: Mapping[str, Any], job: str | None, label: str, threads: int) -> dict[str, Any]:
    """One model in a worker process: the family and data rebuilt from the config."""
    hp = finetune_settings(cfg["model"])
    family, data = embedded_family(cfg["model"], cfg["taskset"], int(cfg.get("seed", 0)))
    torch.set_num_threads(threads)  # evaluation too: the workers share the cores
    return train_model(family_dir(cfg), cfg, hp, family, data, job, label, progress=False)
