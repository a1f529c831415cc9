"""The offline model zoo: fine-tune one model per task, and one multi-task model, from the
packaged pretrained weights, with Lightning; cache and reuse them.

Layout of `<cache>/<family>/` (cache: `--cache-dir`, `zoo.dir`, `$MERGEBENCH_CACHE/zoo`, or
`~/.cache/mergebench/zoo`):
- `pretrained.safetensors`: the backbone as packaged (no head);
- `<task>.safetensors`: the fine-tuned model of one task (backbone + `classifier.*`);
- `multitask/<taskset>/backbone.safetensors` and `multitask/<taskset>/heads/<task>.safetensors`;
- `zoo.json`: per checkpoint, its signature (hash of data fingerprint, seed, model options and
  hyperparameters), data fingerprint, hyperparameters, validation and test metrics, seconds.
A checkpoint is reused when its signature matches, so task sets that share tasks (the
number-of-tasks experiment) share checkpoints; anything else is retrained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mergebench.config import to_plain as _plain  # noqa: E402
from mergebench.errors import MergeBenchError  # noqa: E402
from mergebench.evaluate import score_model  # noqa: E402
from mergebench.models import LabeledData, ZooFamily, load_family  # noqa: E402
from mergebench.models.base import HEAD, head_keys  # noqa: E402

ZOO_FORMAT = 2  # bump when training changes: old checkpoints are retrained
# Hyperparameters a model config's `finetune` section may set (defaults in conf/model/*.yaml).
FINETUNE_KEYS = (
    "epochs", "batch_size", "lr", "head_lr", "weight_decay", "warmup",
    "max_grad_norm", "multitask_epochs", "multitask_lr", "multitask_head_lr",
)  # fmt: skip


# ---------------------------------------------------------------------------- locations


def zoo_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where zoos live: the argument, else `$MERGEBENCH_CACHE/zoo`, else ~/.cache/mergebench/zoo."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MERGEBENCH_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "mergebench"
    return base / "zoo"


def family_dir(cfg: Mapping[str, Any]) -> Path:
    return zoo_root((cfg.get("zoo") or {}).get("dir")) / str(cfg["model"]["name"])


def set_threads(threads: int | None) -> None:
    """Fix torch's CPU threads (`threads` config key); None keeps torch's default (all cores)."""
    if threads:
        torch.set_num_threads(int(threads))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def finetune_settings(cfg_model: Mapping[str, Any]) -> dict[str, Any]:
    hp = dict(_plain(cfg_model.get("finetune")) or {})
    unknown = sorted(set(hp) - set(FINETUNE_KEYS))
    if unknown:
        raise MergeBenchError(
            f"model.finetune: unknown option {unknown[0]!r} (options: {', '.join(FINETUNE_KEYS)})"
        )
    missing = [k for k in FINETUNE_KEYS if k not in hp]
    if missing:
        raise MergeBenchError(f"model.finetune.{missing[0]}: missing")
    return hp


def single_task_settings(hp: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hp.items() if not k.startswith("multitask_")}


def multitask_settings(hp: Mapping[str, Any]) -> dict[str, Any]:
    """The single-task settings with the multi-task overrides applied."""
    out = single_task_settings(hp)
    out.update(
        epochs=hp["multitask_epochs"], lr=hp["multitask_lr"], head_lr=hp["multitask_head_lr"]
    )
    return out


def task_signature(
    cfg_model: Mapping[str, Any], hp: Mapping[str, Any], seed: int, task: str, fingerprint: str
) -> str:
    return _hash(
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(
        {k: v.detach().contiguous().clone() for k, v in tensors.items()},
        str(tmp),
        metadata=dict(meta or {}),
    )
    os.replace(tmp, path)


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
    path = directory / "zoo.json"
    tmp = path.with_name(f".zoo.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- training


class TaskBatches(torch.utils.data.IterableDataset):
    """Shuffled mini-batches of one or several tasks; each batch holds one task only (so a
    multi-task model can run the right head). Reshuffled every epoch from `seed` and the
    epoch number, so a run is reproducible."""

    def __init__(self, data: LabeledData, tasks: Sequence[str], batch_size: int, seed: int) -> None:
        super().__init__()
        self.data, self.tasks, self.batch_size, self.seed = data, list(tasks), batch_size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return sum(
            math.ceil(self.data.num_examples(t, "train") / self.batch_size) for t in self.tasks
        )

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor], torch.Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        plan = []
        for task in self.tasks:
            order = rng.permutation(self.data.num_examples(task, "train"))
            plan += [
                (task, order[i : i + self.batch_size])
                for i in range(0, len(order), self.batch_size)
            ]
        for j in rng.permutation(len(plan)):
            task, idx = plan[j]
            batch, labels = next(self.data.batches(task, "train", len(idx), order=idx))
            yield task, batch, labels


def _lightning_module(
    family: ZooFamily, models: dict[str, torch.nn.Module], hp: Mapping[str, Any], total_steps: int
):
    import lightning as L

    class FineTuner(L.LightningModule):
        """Cross-entropy fine-tuning; one optimizer, the head at its own (higher) rate."""

        def __init__(self) -> None:
            super().__init__()
            # Multi-task: the models share every module but their head (see share_backbone).
            self.models = torch.nn.ModuleDict(models)

        def train(self, mode: bool = True):
            super().train(mode)
            if mode:  # the family decides (the CNN keeps BatchNorm statistics frozen)
                for model in self.models.values():
                    family.set_train_mode(model, multitask=len(models) > 1)
            return self

        def training_step(self, item, batch_idx):
            task, batch, labels = item
            logits = family.logits(self.models[task], batch)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            self.log("loss", loss, prog_bar=True, batch_size=len(labels))
            return loss

        def configure_optimizers(self):
            heads, body = [], []
            for name, p in self.models.named_parameters():
                (heads if f".{HEAD}." in f".{name}" else body).append(p)
            opt = torch.optim.AdamW(
                [{"params": body, "lr": hp["lr"]}, {"params": heads, "lr": hp["head_lr"]}],
                weight_decay=hp["weight_decay"],
            )
            warmup = max(1, int(hp["warmup"] * total_steps))

            def factor(step: int) -> float:  # linear warm-up, then linear decay to zero
                if step < warmup:
                    return (step + 1) / warmup
                return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return FineTuner()


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    # Frozen BatchNorm layers are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")


def fit(
    family: ZooFamily,
    data: LabeledData,
    tasks: Sequence[str],
    hp: Mapping[str, Any],
    epochs: int,
    seed: int,
    progress: bool,
) -> tuple[dict[str, torch.nn.Module], float]:
    """Fine-tune one model per task in `tasks`; with several tasks, one shared backbone."""
    import lightning as L

    _quiet_lightning()
    L.seed_everything(seed, workers=True, verbose=False)
    first = family.new_finetuning_model(tasks[0])
    models = {tasks[0]: first}
    for task in tasks[1:]:
        model = family.build_model(task)  # head seeded by the global generator
        family.share_backbone(first, model)
        models[task] = model
    dataset = TaskBatches(data, tasks, int(hp["batch_size"]), seed)
    total_steps = len(dataset) * epochs
    module = _lightning_module(family, models, hp, total_steps)
    # Lightning >= 2.2 keeps the modules' modes as it finds them: set ours (frozen BN) first.
    module.train()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=hp.get("max_grad_norm"),
        deterministic=True,
    )
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    for model in models.values():
        model.eval()
    return models, time.perf_counter() - start


def _metrics(
    model: torch.nn.Module, data: LabeledData, task: str, batch_size: int
) -> dict[str, dict[str, float]]:
    out = {}
    for split in ("validation", "test"):
        score, _ = score_model(model, data, task, split, batch_size)
        out[split] = {score.metric: score.value}
    return out


# ---------------------------------------------------------------------------- building


def _say(msg: str) -> None:
    print(f"[mergebench-zoo] {msg}", file=sys.stderr, flush=True)


def ensure_zoo(
    cfg: Mapping[str, Any],
    progress: bool = True,
    force: bool = False,
    multitask: bool | None = None,
) -> Path:
    """Build whatever part of the zoo for `cfg`'s family and task set is missing or stale;
    return the family's zoo folder. `cfg` holds `model`, `taskset`, `seed` and `zoo`."""
    from filelock import FileLock

    cfg_model, cfg_taskset = _plain(cfg["model"]), _plain(cfg["taskset"])
    seed = int(cfg.get("seed", 0))
    zoo_cfg = _plain(cfg.get("zoo")) or {}
    with_multitask = bool(zoo_cfg.get("multitask", True)) if multitask is None else multitask
    hp = finetune_settings(cfg_model)
    directory = family_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    family, data = load_family(cfg_model, cfg_taskset, seed)
    set_threads(cfg.get("threads"))

    with FileLock(str(directory / ".lock")):
        manifest = read_manifest(directory)
        pre = directory / "pretrained.safetensors"
        if force or not pre.exists():
            save_atomic(family.pretrained_state(), pre)
        manifest["family"] = cfg_model["name"]
        manifest["pretrained"] = {"file": pre.name, "source": type(family).__module__}

        tasks = list(data.tasks)
        for i, task in enumerate(tasks, 1):
            sig = task_signature(cfg_model, hp, seed, task, data.fingerprint(task))
            entry = manifest["tasks"].get(task, {})
            path = directory / f"{task}.safetensors"
            if not force and entry.get("signature") == sig and path.exists():
                continue
            _say(f"{cfg_model['name']} [{i}/{len(tasks)}] fine-tuning {task} "
                 f"({data.num_examples(task, 'train')} examples, {hp['epochs']} epochs)")  # fmt: skip
            task_seed = seed * 1_000_003 + zlib.crc32(task.encode()) % 1_000_003
            models, seconds = fit(family, data, [task], hp, int(hp["epochs"]), task_seed, progress)
            model = models[task]
            metrics = _metrics(model, data, task, family.eval_batch_size)
            save_atomic(model.state_dict(), path, {"task": task, "signature": sig})
            manifest["tasks"][task] = {
                "signature": sig,
                "file": path.name,
                "data_fingerprint": data.fingerprint(task),
                "seed": seed,
                "train_seed": task_seed,
                "options": cfg_model.get("options") or {},
                "finetune": single_task_settings(hp),
                "examples": {
                    s: data.num_examples(task, s) for s in ("train", "validation", "test")
                },
                "metrics": metrics,
                "train_seconds": round(seconds, 2),
            }
            write_manifest(directory, manifest)
            _say(
                f"{task}: validation {metrics['validation']}, test {metrics['test']} ({seconds:.0f} s)"
            )

        if with_multitask:
            _ensure_multitask(
                directory, manifest, cfg_model, cfg_taskset, hp, seed, family, data, force, progress
            )
        write_manifest(directory, manifest)
    return directory


def _ensure_multitask(
    directory, manifest, cfg_model, cfg_taskset, hp, seed, family, data, force, progress
) -> None:
    name = str(cfg_taskset.get("name", "custom"))
    tasks = list(data.tasks)
    sig = _hash(
        {
            "tasks": {
                t: task_signature(cfg_model, hp, seed, t, data.fingerprint(t)) for t in tasks
            },
            "multitask": multitask_settings(hp),
        }
    )
    folder = directory / "multitask" / name
    entry = manifest["multitask"].get(name, {})
    if not force and entry.get("signature") == sig and (folder / "backbone.safetensors").exists():
        return
    epochs = int(hp["multitask_epochs"])
    _say(f"{cfg_model['name']} multi-task model on {len(tasks)} tasks ({epochs} epochs)")
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
    manifest["multitask"][name] = {
        "signature": sig,
        "folder": str(folder.relative_to(directory)),
        "tasks": tasks,
        "epochs": epochs,
        "finetune": mt_hp,
        "seed": seed,
        "metrics": metrics,
        "train_seconds": round(seconds, 2),
    }
    summary = ", ".join(f"{t}: {m['test']}" for t, m in metrics.items())
    _say(f"multi-task: test {summary} ({seconds:.0f} s)")


# ---------------------------------------------------------------------------- reference rows


class ZooModels:
    """A per-task view of zoo checkpoints with the evaluator's interface, `state_dict(task)`."""

    def __init__(self, kind: str, directory: Path, tasks: Sequence[str], taskset: str = "") -> None:
        self.kind, self.directory, self.tasks, self.taskset = (
            kind,
            Path(directory),
            list(tasks),
            taskset,
        )
        self._shared: dict[str, torch.Tensor] | None = None

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        if not path.exists():
            raise MergeBenchError(f"{path}: zoo checkpoint missing (build it with mergebench-zoo)")
        return load_file(str(path))

    def state_dict(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self.tasks:
            raise MergeBenchError(f"task {task!r} is not in this zoo ({self.tasks})")
        own = self._load(self.directory / f"{task}.safetensors")
        if self.kind == "individual":
            return own
        if self.kind == "pretrained":  # the packaged backbone with the task's own head
            if self._shared is None:
                self._shared = self._load(self.directory / "pretrained.safetensors")
            return {**self._shared, **head_keys(own)}
        if self.kind == "multitask":
            folder = self.directory / "multitask" / self.taskset
            if self._shared is None:
                self._shared = self._load(folder / "backbone.safetensors")
            return {**self._shared, **self._load(folder / "heads" / f"{task}.safetensors")}
        raise MergeBenchError(
            f"reference row {self.kind!r}: unknown (individual, pretrained, multitask)"
        )


# ---------------------------------------------------------------------------- CLI


def compose_config(overrides: Sequence[str]) -> Any:
    """The Hydra config of the `mergebench` app with `overrides` (no Hydra run folder)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mergebench.config import conf_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


DEFAULT_SETS = ("text", "vision")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mergebench-zoo",
        description="Build (once, cached) the offline zoo: fine-tuned models per task and a "
        "multi-task model, for each task set. Extra KEY=VALUE arguments are Hydra overrides "
        "of the mergebench config (e.g. model.finetune.epochs=1).",
    )
    parser.add_argument("--set", dest="sets", nargs="+", default=list(DEFAULT_SETS),
                        help="task sets to build (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--cache-dir",
        help="zoo cache folder (default $MERGEBENCH_CACHE/zoo or ~/.cache/mergebench/zoo)",
    )
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument("--no-multitask", action="store_true", help="skip the multi-task models")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. seed=1")
    args = parser.parse_args(argv)
    try:
        from mergebench.config import load_group

        for name in args.sets:
            family = load_group("taskset", name).get("family")
            overrides = [f"taskset={name}", f"model={family}", *args.overrides]
            if args.cache_dir:
                overrides.append(f"zoo.dir={args.cache_dir}")
            cfg = compose_config(overrides)
            start = time.perf_counter()
            directory = ensure_zoo(
                cfg, progress=not args.no_progress, force=args.force,
                multitask=False if args.no_multitask else None,
            )  # fmt: skip
            _say(f"{name}: zoo ready in {directory} ({time.perf_counter() - start:.0f} s)")
    except MergeBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
