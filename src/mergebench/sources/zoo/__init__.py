"""The offline model zoo: fine-tune one model per task, and one multi-task model, from the
packaged pretrained weights, with Lightning; cache and reuse them.

Layout of `<cache>/<family>/` (cache: `--cache-dir`, `zoo.dir`, `$MERGEBENCH_CACHE/zoo`, or
`~/.cache/mergebench/zoo`):
- `pretrained.safetensors`: the backbone as packaged (no head);
- `<task>.safetensors`: the fine-tuned model of one task (backbone + `classifier.*`);
- `multitask/<taskset>/backbone.safetensors` and `multitask/<taskset>/heads/<task>.safetensors`;
- `zoo.json`: per checkpoint, its signature (hash of data fingerprint, seed, model options and
  hyperparameters), data fingerprint, hyperparameters, validation metrics, seconds;
- `references/<taskset>.json`: the reference rows (individual, multi-task, pretrained) on the
  test split with every prediction, evaluated once by `mergebench-zoo` (or the first benchmark
  job) and keyed by the zoo signature.
A checkpoint is reused when its signature matches, so task sets that share tasks (the
number-of-tasks experiment) share checkpoints; anything else is retrained.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mergebench.engine.pool import ModelPool
from mergebench.evaluation import score_model
from mergebench.families import ZooFamily, embedded_family
from mergebench.families.base import HEAD, head_keys
from mergebench.families.labeled import LabeledData
from mergebench.sources.zoo.references import ZooModels
from mergebench.sources.zoo.train import fit
from mergebench.util.config import to_plain as _plain
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import atomic_file, atomic_write_text
from mergebench.util.hashing import stable_hash
from mergebench.util.paths import cache_root

ZOO_FORMAT = 2  # bump when training changes: old checkpoints are retrained
# Hyperparameters a model config's `finetune` section may set (defaults in conf/model/*.yaml).
FINETUNE_KEYS = (
    "epochs", "batch_size", "lr", "head_lr", "weight_decay", "warmup",
    "max_grad_norm", "multitask_epochs", "multitask_lr", "multitask_head_lr",
)  # fmt: skip
# Optional fine-tuning settings: `threads` fixes torch's CPU threads while training (CPU
# convolutions add up in a thread-count-dependent order; a fixed count makes the zoo the
# same bit for bit on any machine). `multitask_batches`: `per_task` (default: each batch holds
# one task) or `mixed` (each batch drawn from all tasks' examples: what BatchNorm statistics
# that train need, since the model is evaluated with statistics of the mixture).
OPTIONAL_FINETUNE_KEYS = ("threads", "multitask_batches")
MULTITASK_BATCHES = ("per_task", "mixed")


# ---------------------------------------------------------------------------- locations


def zoo_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where zoos live: the argument, else `$MERGEBENCH_CACHE/zoo`, else ~/.cache/mergebench/zoo."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return cache_root() / "zoo"


def family_dir(cfg: Mapping[str, Any]) -> Path:
    """The family's zoo folder: `<zoo dir>/<family>` for seed 0, `<family>-seed<n>` for any
    other seed, so the zoos of a multi-seed sweep live side by side instead of retraining
    each other's checkpoints."""
    seed = int(cfg.get("seed", 0) or 0)
    name = str(cfg["model"]["name"]) + (f"-seed{seed}" if seed else "")
    return zoo_root((cfg.get("zoo") or {}).get("dir")) / name


def set_threads(threads: int | None) -> None:
    """Fix torch's CPU threads (`threads` config key); None keeps torch's default (all cores)."""
    if threads:
        torch.set_num_threads(int(threads))


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


def task_signature(
    cfg_model: Mapping[str, Any], hp: Mapping[str, Any], seed: int, task: str, fingerprint: str
) -> str:
    return stable_hash(
        {
            "format": ZOO_FORMAT,
            "family": cfg_model["name"],
            "options": _plain(cfg_model.get("options")) or {},
            "finetune": single_task_settings(hp),
            "seed": seed,
            "task": task,
            "data": fingerprint,
        }
    )


# ---------------------------------------------------------------------------- io


def save_atomic(
    tensors: Mapping[str, torch.Tensor], path: Path, meta: Mapping[str, str] | None = None
) -> None:
    """safetensors via a temporary file and a rename: a crash never leaves half a checkpoint."""
    plain = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_file(path, lambda tmp: save_file(plain, str(tmp), metadata=dict(meta or {})))


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / "zoo.json"
    if not path.exists():
        return {"format": ZOO_FORMAT, "tasks": {}, "multitask": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MergeBenchError(f"{path}: not valid JSON ({err.msg}); delete it to rebuild") from err
    data.setdefault("tasks", {})
    data.setdefault("multitask", {})
    return data


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write_text(directory / "zoo.json", json.dumps(manifest, indent=2, sort_keys=True))


def _metrics(
    model: torch.nn.Module, data: LabeledData, task: str, batch_size: int
) -> dict[str, dict[str, float]]:
    """Validation score, a sanity check of the fine-tune. The test split is scored once, by
    the reference rows (`mergebench-zoo` evaluates and caches them right after training)."""
    score, _ = score_model(model, data, task, "validation", batch_size)
    return {"validation": {score.metric: score.value}}


# ---------------------------------------------------------------------------- building


def say(msg: str) -> None:
    print(f"[mergebench-zoo] {msg}", file=sys.stderr, flush=True)


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
                or entry.get("signature") != _multitask_signature(cfg_model, hp, seed, data)
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
                record(job, _train(directory, cfg, hp, family, data, job, labels[job], progress))
        else:
            _train_in_processes(cfg, hp, data, jobs, labels, workers, record)
        write_manifest(directory, manifest)
    return directory


def zoo_workers(zoo_cfg: Mapping[str, Any], hp: Mapping[str, Any], jobs: int) -> int:
    """Processes that train the zoo's models side by side: `zoo.workers`, or (null) as many
    as the cores hold at the family's fixed training threads; 1 when training threads are
    not fixed (torch then uses every core for one model already)."""
    workers = zoo_cfg.get("workers")
    if workers is None:
        if not hp.get("threads"):
            return 1
        workers = max(1, (os.cpu_count() or 1) // int(hp["threads"]))
    elif isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise MergeBenchError(f"zoo.workers: {workers!r} (a positive integer, or null)")
    return max(1, min(workers, jobs))


def _train_in_processes(
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
    return _train(family_dir(cfg), cfg, hp, family, data, job, label, progress=False)


def _train(
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


def _multitask_signature(
    cfg_model: Mapping[str, Any], hp: Mapping[str, Any], seed: int, data: LabeledData
) -> str:
    return stable_hash(
        {
            "tasks": {
                t: task_signature(cfg_model, hp, seed, t, data.fingerprint(t)) for t in data.tasks
            },
            "multitask": multitask_settings(hp),
        }
    )


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
        "signature": _multitask_signature(cfg_model, hp, seed, data),
        "folder": str(folder.relative_to(directory)),
        "tasks": tasks,
        "epochs": epochs,
        "finetune": mt_hp,
        "seed": seed,
        "metrics": metrics,
        "train_seconds": round(seconds, 2),
    }


# ---------------------------------------------------------------------------- the source


def zoo_pool(
    cfg_model: Mapping[str, Any],
    cfg_taskset: Mapping[str, Any],
    zoo_dir: str | Path,
    family: ZooFamily,
    data: LabeledData,
) -> ModelPool:
    """The pool over the zoo's checkpoints of an already loaded family."""
    zoo_dir = Path(zoo_dir)
    paths = [zoo_dir / "pretrained.safetensors"] + [
        zoo_dir / f"{t}.safetensors" for t in data.tasks
    ]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MergeBenchError(
            f"{missing[0]}: zoo checkpoint missing (build it with mergebench-zoo)"
        )
    return ModelPool.from_checkpoints(
        zoo_dir / "pretrained.safetensors",
        {t: zoo_dir / f"{t}.safetensors" for t in data.tasks},
        exclude=list(cfg_model.get("exclude") or [rf"{HEAD}\..*"]),
        family=family,
        name=f"{cfg_model['name']}/{cfg_taskset.get('name', 'custom')}",
        layer_pattern=cfg_model.get("layer_pattern"),
    )


class ZooSource:
    """A `CheckpointSource` over the offline zoo, built (or refreshed) first when allowed."""

    def __init__(self, cfg: Mapping[str, Any], progress: bool = True) -> None:
        self.cfg_model, self.cfg_taskset = _plain(cfg["model"]), _plain(cfg["taskset"])
        self.taskset = str(self.cfg_taskset["name"])
        seed = int(cfg.get("seed", 0))
        zoo = _plain(cfg.get("zoo")) or {}
        self.directory = family_dir(cfg)
        if zoo.get("build_missing", True):
            ensure_zoo(cfg, progress=progress)
        self.family, self.data = embedded_family(self.cfg_model, self.cfg_taskset, seed)
        self.manifest = read_manifest(self.directory)
        missing = [t for t in self.data.tasks if t not in self.manifest["tasks"]]
        if missing:
            raise MergeBenchError(
                f"zoo.dir: no fine-tuned {missing[0]!r} in {self.directory} "
                "(run mergebench-zoo, or set zoo.build_missing=true)"
            )

    def signature(self) -> str:
        tasks = self.manifest["tasks"]
        return stable_hash(
            {
                "tasks": {t: tasks[t]["signature"] for t in self.data.tasks},
                "multitask": self.manifest["multitask"].get(self.taskset, {}).get("signature"),
            }
        )

    def cache_dir(self) -> Path:
        return self.directory

    def pool(self) -> ModelPool:
        return zoo_pool(self.cfg_model, self.cfg_taskset, self.directory, self.family, self.data)

    def reference_kinds(self) -> tuple[str, ...]:
        if self.taskset in self.manifest["multitask"]:
            return ("individual", "multitask", "pretrained")
        return ("individual", "pretrained")

    def reference(self, kind: str) -> ZooModels:
        return ZooModels(kind, self.directory, self.data.tasks, self.taskset)
