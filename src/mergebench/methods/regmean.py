"""RegMean: merge each linear layer by the closed-form least-squares solution (methods.md).

For a linear layer `y = x W^T`, RegMean picks the `W` whose outputs on every task's inputs
are closest to that task's fine-tuned layer: `W^T = (sum_t G_t)^-1 sum_t G_t W_t^T`, with
`G_t` the Gram matrix of the layer's inputs on task `t`. Off-diagonals of each `G_t` are
multiplied by `alpha` (1 = plain RegMean, 0 = a per-input-feature weighted average), which
keeps the system well conditioned. All other merged tensors are averaged.

Details that follow the RegMean reference code rather than the bare formula:
- `G_t` is the mean of `x x^T` over the rows seen (tokens for a text model), so a task with
  longer inputs does not weigh more than the others;
- rows that are padding (where the batch has an `attention_mask` of matching shape) are left
  out, since their activations depend on how a batch happened to be padded;
- GPT-2's `Conv1D` is a linear layer whose weight is stored transposed (`[in, out]`).
Grams are summed in float64 and each system is solved in float64.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mergebench.engine.keyplan import plan_keys
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TaskVectorStream
from mergebench.methods.base import DEFAULT_CONTEXT, Method, RunContext, single_result
from mergebench.methods.data_utils import InputsOnly, batch_size_of, inputs_only, load_task_model
from mergebench.methods.options import choice, fraction, integer, option
from mergebench.results import SingleModelResult
from mergebench.util.errors import MergeBenchError
from mergebench.util.progress import track


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """Multiply the off-diagonal entries of a square matrix by `alpha`, keep the diagonal."""
    diagonal = torch.diagonal(gram).clone()
    scaled = gram * alpha
    scaled.diagonal().copy_(diagonal)
    return scaled


def linear_layers(model: nn.Module) -> dict[str, bool]:
    """Module name -> whether its weight is stored transposed (`[in, out]`, GPT-2 Conv1D)."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found[name] = False
        elif conv1d is not None and isinstance(module, conv1d):
            found[name] = True
    return found


def solve_layer(lhs: torch.Tensor, rhs: torch.Tensor, key: str) -> torch.Tensor:
    """`lhs^-1 rhs` in float64, or a clear error naming the layer when it has no solution."""
    solution, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0 or not torch.isfinite(solution).all():
        raise MergeBenchError(
            f"regmean: the system of layer {key!r} is singular (some input features are always "
            "zero on every task); use alpha < 1 or more num_examples"
        )
    return solution


@dataclass
class GramCollector:
    """Forward hooks that accumulate each hooked layer's input Gram matrix on one task."""

    layers: dict[str, nn.Module]
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    row_mask: torch.Tensor | None = None
    # q, k and v read the same tensor: its Gram is computed once per batch. The entry keeps
    # the tensor alive, so that no later tensor of the batch can reuse its memory address.
    _seen: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in self.layers.items()
        ]

    def new_batch(self, batch: dict[str, torch.Tensor]) -> None:
        mask = batch.get("attention_mask")
        self.row_mask = None if mask is None else mask.reshape(-1).bool()
        self._seen.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            tag = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if tag not in self._seen:
                rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                if self.row_mask is not None and rows.shape[0] == self.row_mask.numel():
                    rows = rows[self.row_mask.to(rows.device)]
                self._seen[tag] = (x, (rows.T @ rows).to(torch.float64), rows.shape[0])
            _, gram, count = self._seen[tag]
            if name in self.grams:
                self.grams[name] += gram
            else:
                self.grams[name] = gram.clone()
            self.rows[name] = self.rows.get(name, 0) + count

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class RegMean(Method):
    name = "regmean"
    needs_data = True

    num_examples: int | None = option(integer, allow_none=True)
    alpha: float = option(fraction, low_open=False)
    batch_size: int = option(integer)
    split: str = option(choice, allowed=("train", "validation"))

    def merge(self, pool: ModelPool, context: RunContext = DEFAULT_CONTEXT) -> SingleModelResult:
        data = inputs_only(pool, self.name)
        plan = plan_keys(pool)
        device = torch.device(context.device)
        merged_keys = set(plan.merged)
        probe = data.build_model(pool.tasks[0])
        # A linear layer is merged by RegMean when its weight is a merged (not head) tensor.
        transposed = {
            name: t for name, t in linear_layers(probe).items() if f"{name}.weight" in merged_keys
        }
        del probe
        lhs: dict[str, torch.Tensor] = {}
        rhs: dict[str, torch.Tensor] = {}
        reached: dict[str, int] = {}  # layer -> number of tasks whose inputs reached it
        rows_per_task: dict[str, int] = {}
        grams = track(pool.tasks, "regmean: grams", enabled=context.progress, unit="task", every=1)
        for task in grams:
            model = load_task_model(pool, data, task, device, self.name)
            modules = dict(model.named_modules())
            collector = GramCollector({name: modules[name] for name in transposed})
            try:
                rows_per_task[task] = self._collect(data, model, collector, task, device)
            finally:
                collector.close()
            for name, gram_sum in collector.grams.items():
                gram = scale_off_diagonal(gram_sum / collector.rows[name], self.alpha)
                weight = modules[name].weight.detach().to(torch.float64)
                weight_in_out = weight if transposed[name] else weight.T
                lhs[name] = lhs[name] + gram if name in lhs else gram
                product = gram @ weight_in_out
                rhs[name] = rhs[name] + product if name in rhs else product
                reached[name] = reached.get(name, 0) + 1
            del model, modules, collector

        solved: dict[str, torch.Tensor] = {}
        for name in transposed:
            # A layer that the inputs of some task never reach has no Gram there: averaged.
            if reached.get(name, 0) < len(pool.tasks):
                continue
            key = f"{name}.weight"
            solution = solve_layer(lhs.pop(name), rhs.pop(name), key)
            solved[key] = solution if transposed[name] else solution.T

        stream = TaskVectorStream(pool, plan, device=device, progress=context.progress)
        shared: dict[str, torch.Tensor] = {}
        for item in stream.passes(self.name):
            if item.key in solved:
                value = solved[item.key]
            else:
                value = item.pretrained + item.task_vectors.mean(dim=0)
            shared[item.key] = value.to(item.dtype).cpu()
        result = single_result(self, pool, plan, shared)
        averaged = sorted(f"{name}.weight" for name in transposed if f"{name}.weight" not in solved)
        result.extra = {
            "regmean_layers": len(solved),
            "linear_layers_averaged": averaged,  # never reached by the inputs of some task
            "rows_per_task": rows_per_task,
        }
        return result

    def _collect(
        self,
        data: InputsOnly,
        model: nn.Module,
        collector: GramCollector,
        task: str,
        device: torch.device,
    ) -> int:
        examples = 0
        with torch.no_grad():
            for batch in data.batches(task, self.split, self.num_examples, self.batch_size, device):
                collector.new_batch(batch)
                data.logits(model, batch)
                examples += batch_size_of(batch)
        if examples == 0:
            raise MergeBenchError(f"{self.name}: task {task!r} has no {self.split} inputs")
        return examples
