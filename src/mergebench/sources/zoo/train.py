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
from mergebench.util.progress import on_terminal


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
        trainer.fit(module, train_dataloaders=loader)
    finally:
        torch.set_num_threads(threads_before)
    for model in models.values():
        model.eval()
    return models, time.perf_counter() - start
