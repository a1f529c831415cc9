"""AdaMerging: learn merging coefficients by minimising prediction entropy (methods.md).

`W = W_pre + sum_t lam_t^l tau_t^l` on every merged tensor `l`: one coefficient per task
(`granularity=task`) or one per task per merged tensor (`layer`). The coefficients start at
`init` and are trained with Adam to minimise the mean Shannon entropy of each task's
predictions on its unlabeled test inputs (as the AdaMerging paper does), one batch per task
per step, the task losses summed. With `clamp`, the coefficients used in the forward pass are
`clamp(lam, 0, 1)`, as in the official code (a raw value outside [0, 1] gets no gradient).
Each task predicts with its own head (the pool's excluded keys). A regression head (one output)
has no prediction entropy and adds nothing to the loss.

`ties=true` is AdaMerging++: the task vectors are first trimmed to their top `ties_k`
fraction and only entries agreeing with the elected sign are kept (TIES' trim and elect,
reusing `mergebench.methods.ties`). With equal coefficients `c` this is TIES with
`aggregate=sum` and `scaling=c`; AdaMerging then learns the coefficients.

Training runs under Lightning Fabric (`accelerator`, `precision`). The result records the
learned coefficients (the clamped values, which are the ones applied), the entropy per step,
and, when saved, a heat map of the coefficients (`coefficients.png`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergebench.engine.keyplan import KeyPlan, plan_keys
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TaskVectorStream
from mergebench.methods.base import DEFAULT_CONTEXT, Method, RunContext, sign, single_result
from mergebench.methods.data_utils import InputsOnly, cycle_batches, inputs_only, load_task_model
from mergebench.methods.options import choice, flag, fraction, integer, number, option
from mergebench.methods.ties import Ties, trim
from mergebench.results import SingleModelResult
from mergebench.util.errors import MergeBenchError
from mergebench.util.progress import stage

# "bf16-true"/"16-true" would store the coefficients themselves in 16 bits, where an Adam step
# of 1e-3 on 0.3 rounds away: only precisions that keep them in float32 or better.
PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PLOT_FILE = "coefficients.png"


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Shannon entropy of `softmax(logits)` (in nats)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


def ties_task_vectors(task_vectors: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """AdaMerging++'s task vectors: TIES-trimmed, then only entries with the elected sign."""
    trimmed = trim(task_vectors, thresholds)
    gamma = sign(trimmed.sum(dim=0))
    return trimmed * (trimmed * gamma > 0)


def _is_channels_last(tensor: torch.Tensor) -> bool:
    return (
        tensor.dim() == 4
        and not tensor.is_contiguous()
        and tensor.is_contiguous(memory_format=torch.channels_last)
    )


class _TaskLogits(nn.Module):
    """Wraps one task's model so that `functional_call` reaches it through the family."""

    def __init__(self, model: nn.Module, data: InputsOnly) -> None:
        super().__init__()
        self.model = model
        self._data = data

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._data.logits(self.model, batch)


class MergedModels(nn.Module):
    """The trainable coefficients and, as frozen buffers, `W_pre` and the task vectors."""

    def __init__(
        self,
        keys: list[str],
        pretrained: list[torch.Tensor],
        task_vectors: list[torch.Tensor],
        task_models: list[_TaskLogits],
        granularity: str,
        init: float,
        clamp: bool,
    ) -> None:
        super().__init__()
        self.keys = keys
        # Buffers (BatchNorm running statistics) are merged with the same coefficients, but
        # torch cannot differentiate through them: they follow the coefficients without
        # passing gradient back (layer-wise, their own coefficients stay at `init`).
        buffers = {name for name, _ in task_models[0].model.named_buffers()}
        self.buffer_keys = [key in buffers for key in keys]
        # Merged weights take the memory format of the model's own (channels_last convolutions
        # run faster on CPU; a contiguous weight would silently undo that).
        own = task_models[0].model.state_dict()
        self.channels_last = [_is_channels_last(own[key]) if key in own else False for key in keys]
        self.clamp = clamp
        self.granularity = granularity
        num_tasks = task_vectors[0].shape[0]
        columns = len(keys) if granularity == "layer" else 1
        self.coefficients = nn.Parameter(torch.full((num_tasks, columns), float(init)))
        # Keys hold dots, which buffer names may not: buffers are numbered in `keys` order.
        for i, (pre, taus) in enumerate(zip(pretrained, task_vectors, strict=True)):
            self.register_buffer(f"pre_{i}", pre, persistent=False)
            self.register_buffer(f"tau_{i}", taus, persistent=False)
        self.task_models = nn.ModuleList(task_models)
        self.task_models.requires_grad_(False)

    def applied_coefficients(self) -> torch.Tensor:
        lam = self.coefficients
        return lam.clamp(0.0, 1.0) if self.clamp else lam

    def merged_weights(self) -> dict[str, torch.Tensor]:
        lam = self.applied_coefficients()
        weights = {}
        for i, key in enumerate(self.keys):
            taus = getattr(self, f"tau_{i}")
            column = lam[:, i if self.granularity == "layer" else 0].to(taus.dtype)
            if self.buffer_keys[i]:
                column = column.detach()
            # A matrix-vector product: no [N, *shape] temporary, forward or backward.
            weight = getattr(self, f"pre_{i}") + torch.tensordot(column, taus, dims=1)
            if self.channels_last[i]:
                weight = weight.contiguous(memory_format=torch.channels_last)
            weights[key] = weight
        return weights

    def forward(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Per-task mean prediction entropy `[N]` of the merged model on one batch per task."""
        weights = {f"model.{k}": v for k, v in self.merged_weights().items()}
        entropies = [
            prediction_entropy(torch.func.functional_call(model, weights, (batch,)))
            for model, batch in zip(self.task_models, batches, strict=True)
        ]
        return torch.stack(entropies)


def inside_clamp(where: str, given: Any, init: float, earlier: Mapping[str, Any]) -> None:
    if earlier["clamp"] and not 0.0 <= init <= 1.0:
        raise MergeBenchError(f"{where}: {given!r} is outside [0, 1], where clamp=true keeps it")


def positive(where: str, given: Any, value: float, earlier: Mapping[str, Any]) -> None:
    if not value > 0:
        raise MergeBenchError(f"{where}: {given!r} must be a positive number")


def precision_option(method: str, option: str, value: Any) -> str:
    """One of PRECISIONS, compared (and named in the error) as text."""
    return choice(method, option, str(value), PRECISIONS)


class AdaMerging(Method):
    name = "adamerging"

    label_options = ("ties",)

    @classmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        """`adamerging`, or `adamerging++` with TIES-trimmed task vectors (`ties=true`)."""
        return "adamerging++" if params.get("ties") else "adamerging"

    needs_data = True

    # Checked in this order: `init`'s check reads `clamp`.
    granularity: str = option(choice, allowed=("task", "layer"))
    clamp: bool = option(flag)
    init: float = option(number, also=inside_clamp)
    lr: float = option(number, also=positive)
    steps: int = option(integer, minimum=0)
    batch_size: int = option(integer)
    num_examples: int | None = option(integer, allow_none=True)
    ties: bool = option(flag)
    ties_k: float = option(fraction)
    ties_topk_scope: str = option(choice, allowed=("global", "tensor"))
    precision: str = option(precision_option)
    accelerator: str = option(choice, allowed=ACCELERATORS)

    # -- task vectors ----------------------------------------------------------------------
    def _task_vectors(
        self, pool: ModelPool, plan: KeyPlan, progress: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        stream = TaskVectorStream(pool, plan, progress=progress)
        ties = None
        if self.ties:
            ties = Ties(
                k=self.ties_k, scaling=1.0, aggregate="sum", topk_scope=self.ties_topk_scope
            )
            ties.prepare(stream)
        pretrained, task_vectors = [], []
        for item in stream.passes(f"{self.name}: task vectors"):
            taus = item.task_vectors
            if ties is not None:
                taus = ties_task_vectors(taus, ties.thresholds_for(taus))
            pretrained.append(item.pretrained)
            task_vectors.append(taus)
        return pretrained, task_vectors

    # -- merge -----------------------------------------------------------------------------
    def merge(self, pool: ModelPool, context: RunContext = DEFAULT_CONTEXT) -> SingleModelResult:
        data = inputs_only(pool, self.name)
        plan = plan_keys(pool)
        pretrained, task_vectors = self._task_vectors(pool, plan, context.progress)
        task_models = [
            _TaskLogits(load_task_model(pool, data, task, torch.device("cpu"), self.name), data)
            for task in pool.tasks
        ]
        module = MergedModels(
            plan.merged,
            pretrained,
            task_vectors,
            task_models,
            self.granularity,
            self.init,
            self.clamp,
        )
        entropy = self._train(module, data, pool.tasks, context.progress) if self.steps > 0 else []
        with torch.no_grad():
            merged = {k: v.detach().float().cpu() for k, v in module.merged_weights().items()}
            lam = module.applied_coefficients().detach().float().cpu()
        shared = {k: merged[k].to(pool.pretrained.dtype(k)) for k in plan.merged}
        result = single_result(self, pool, plan, shared)
        result.extra = {
            "granularity": self.granularity,
            "ties": self.ties,
            "coefficients": {t: lam[i].tolist() for i, t in enumerate(pool.tasks)},
            "coefficient_keys": plan.merged if self.granularity == "layer" else ["*"],
            "entropy": entropy,
        }
        return AdaMergingResult(**vars(result))

    def _train(
        self, module: MergedModels, data: InputsOnly, tasks: list[str], progress: bool
    ) -> list[float]:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator=self.accelerator, devices=1, precision=self.precision)
        optimizer = torch.optim.Adam([module.coefficients], lr=self.lr, betas=(0.9, 0.999))
        model, optimizer = fabric.setup(module, optimizer)
        streams = [
            cycle_batches(
                data, task, "test", self.num_examples, self.batch_size, fabric.device, self.name
            )
            for task in tasks
        ]
        history: list[float] = []
        every = max(1, self.steps // 10)  # about ten lines in a log, whatever `steps`
        with stage(self.steps, self.name, enabled=progress, unit="step", every=every) as bar:
            for _ in range(self.steps):
                entropies = model([next(s) for s in streams])
                loss = entropies.sum()
                optimizer.zero_grad()
                fabric.backward(loss)
                optimizer.step()
                history.append(float(loss.detach()))
                bar.set_postfix_str(f"entropy {history[-1]:.4f}", refresh=False)
                bar.update()
        module.to("cpu")
        return history


class AdaMergingResult(SingleModelResult):
    """A single merged model that also draws its learned coefficients when saved."""

    def save(self, directory: str | Path) -> Path:
        path = super().save(directory)
        plot_coefficients(self.extra, path / PLOT_FILE, title=f"{self.method} coefficients")
        return path


def plot_coefficients(extra: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Heat map of learned coefficients, tasks x merged tensors (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(extra["coefficients"])
    values = [extra["coefficients"][t] for t in tasks]
    keys = extra.get("coefficient_keys") or ["*"] * len(values[0])
    width = min(24.0, 3.0 + 0.12 * len(keys))
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.45 * len(tasks)))
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(tasks)), tasks)
    step = max(1, len(keys) // 40)  # at most ~40 labelled columns
    ax.set_xticks(range(0, len(keys), step), keys[::step], rotation=90, fontsize=6)
    ax.set_xlabel("merged tensor" if len(keys) > 1 else "all tensors (task-wise)")
    ax.set_title(title or "learned coefficients")
    fig.colorbar(image, ax=ax, label="coefficient")
    fig.tight_layout()
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
