"""Fine-tuning for the zoo (Lightning): one model per task, or one multi-task model with a
shared backbone and per-task heads. Reproducible: seeded heads, dropout and batch order,
`deterministic=True`."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mergebench.families.base import HEAD, ZooFamily
from mergebench.families.labeled import LabeledData
from mergebench.sources.zoo.probe import fit_probe_head
from mergebench.util.errors import MergeBenchError
from mergebench.util.progress import on_terminal


class TaskBatches(torch.utils.data.IterableDataset):
    """Shuffled mini-batches of one or several tasks, reshuffled every epoch from `seed` and
    the epoch number, so a run is reproducible. Every training example is seen once per
    epoch: each task gets as many examples per epoch as in its own run.

    Per task (default): each batch holds one task only, `(task, inputs, labels)`, and each
    task gets as many batches as in its own run. Mixed: each batch is drawn from the shuffled
    union of all tasks' examples, `(tasks, inputs, labels, sizes)` with the examples grouped
    by task (`sizes[i]` of `tasks[i]`), so layers that normalise over the batch (BatchNorm)
    see the mixture of tasks they are evaluated on.
    """

    def __init__(
        self,
        data: LabeledData,
        tasks: Sequence[str],
        batch_size: int,
        seed: int,
        mixed: bool = False,
    ) -> None:
        super().__init__()
        self.data, self.tasks, self.batch_size, self.seed = data, list(tasks), batch_size, seed
        self.mixed = mixed
        self.epoch = 0

    def __len__(self) -> int:
        sizes = [self.data.num_examples(t, "train") for t in self.tasks]
        if self.mixed:
            return math.ceil(sum(sizes) / self.batch_size)
        return sum(math.ceil(n / self.batch_size) for n in sizes)

    def __iter__(self) -> Iterator[tuple]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        if self.mixed:
            yield from self._mixed(rng)
            return
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

    def _mixed(self, rng: np.random.Generator) -> Iterator[tuple]:
        owner = np.concatenate(
            [np.full(self.data.num_examples(t, "train"), i) for i, t in enumerate(self.tasks)]
        )
        index = np.concatenate([np.arange(self.data.num_examples(t, "train")) for t in self.tasks])
        order = rng.permutation(len(owner))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            tasks, parts, labels = [], [], []
            for i, task in enumerate(self.tasks):
                idx = index[chunk[owner[chunk] == i]]
                if len(idx):
                    batch, lab = next(self.data.batches(task, "train", len(idx), order=idx))
                    tasks.append(task)
                    parts.append(batch)
                    labels.append(lab)
            try:
                inputs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            except RuntimeError as err:  # e.g. texts padded to different lengths
                raise MergeBenchError(
                    f"mixed multi-task batches need inputs of one shape across tasks ({err})"
                ) from err
            yield tuple(tasks), inputs, torch.cat(labels), tuple(len(x) for x in labels)


def mixed_logits(
    family: ZooFamily,
    models: Mapping[str, torch.nn.Module],
    tasks: Sequence[str],
    inputs: dict[str, torch.Tensor],
    sizes: Sequence[int],
) -> list[torch.Tensor]:
    """Logits of a mixed batch: one forward pass of the shared backbone over all examples
    (what the head receives is caught with a hook), then each task's head on its rows."""
    first = models[tasks[0]]
    caught: list[torch.Tensor] = []
    handle = getattr(first, HEAD).register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
    try:
        family.logits(first, inputs)
    finally:
        handle.remove()
    features = caught[0].split(list(sizes))
    return [getattr(models[t], HEAD)(f) for t, f in zip(tasks, features, strict=True)]


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
            if len(item) == 4:  # a mixed batch: the mean loss over all its examples
                tasks, batch, labels, sizes = item
                logits = mixed_logits(family, self.models, tasks, batch, sizes)
                loss = sum(
                    torch.nn.functional.cross_entropy(lg, lb, reduction="sum")
                    for lg, lb in zip(logits, labels.split(list(sizes)), strict=True)
                ) / len(labels)
            else:
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
    """Fine-tune one model per task in `tasks`; with several tasks, one shared backbone.
    `hp["head_init"] == "probe"`: each head starts as its task's linear probe (LP-FT)."""
    import lightning as L

    _quiet_lightning()
    L.seed_everything(seed, workers=True, verbose=False)
    first = family.new_finetuning_model(tasks[0])
    models = {tasks[0]: first}
    for task in tasks[1:]:
        model = family.build_model(task)  # head seeded by the global generator
        family.share_backbone(first, model)
        models[task] = model
    mixed = hp.get("batches", "per_task") == "mixed"
    dataset = TaskBatches(data, tasks, int(hp["batch_size"]), seed, mixed=mixed)
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
        enable_progress_bar=progress and on_terminal(),  # logs: no \r bars
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=hp.get("max_grad_norm"),
        deterministic=True,
    )
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0)
    threads_before = torch.get_num_threads()
    if hp.get("threads"):  # a fixed count: the same weights bit for bit on any machine
        torch.set_num_threads(int(hp["threads"]))
    try:
        if hp.get("head_init", "random") == "probe":  # before any backbone update
            for task, model in models.items():
                fit_probe_head(family, model, data, task)
            module.train()  # the family's training mode again (the features ran in eval)
        trainer.fit(module, train_dataloaders=loader)
    finally:
        torch.set_num_threads(threads_before)
    for model in models.values():
        model.eval()
    return models, time.perf_counter() - start
