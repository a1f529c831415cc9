"""Fisher merging: `W = sum_t F_t W_t / sum_t F_t` elementwise (Matena & Raffel; methods.md).

`F_t` is the diagonal Fisher of model `t` on its own task's inputs. No labels are used: the
expectation is taken over the model's own predicted distribution, exactly rather than by
sampling, as Matena & Raffel do: per example `x`,
`F += sum_y p(y|x) * (d log p(y|x) / d theta)^2`, averaged over the examples. A regression
head (one output, GLUE's STS-B) uses a unit-variance Gaussian: `F += (d f(x) / d theta)^2`.

Options:
- `normalize`: divide each task's Fisher by its L2 norm over all merged parameters first,
  so that a task whose model happens to have larger gradients does not dominate;
- `min_fisher`: every Fisher entry is at least this (after normalising), so that the
  denominator never vanishes; where no task has information the result is the average.
Merged tensors that are not parameters (BatchNorm running statistics) have no gradient and
are averaged, as are parameters the forward pass never reaches (all-zero Fisher).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mergebench.engine.keyplan import plan_keys
from mergebench.engine.pool import ModelPool, Split
from mergebench.engine.stream import TaskVectorStream
from mergebench.methods.base import DEFAULT_CONTEXT, Method, RunContext, single_result
from mergebench.methods.data_utils import InputsOnly, batch_size_of, inputs_only, load_task_model
from mergebench.methods.options import choice, flag, integer, number, option
from mergebench.results import SingleModelResult
from mergebench.util.errors import MergeBenchError
from mergebench.util.progress import track


@contextmanager
def sparse_embedding_grads(model: nn.Module) -> Iterator[None]:
    """Embedding gradients as sparse rows while the Fisher is computed: one example touches a
    few dozen of a vocabulary's rows, and squaring a dense [vocab, dim] gradient for every
    class of every example would dominate the cost (half of MiniLM's weights are embeddings)."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding) and not m.sparse]
    for module in embeddings:
        module.sparse = True
    try:
        yield
    finally:
        for module in embeddings:
            module.sparse = False


def add_squared(acc: torch.Tensor, grad: torch.Tensor | None, weight: float) -> None:
    """`acc += weight * grad^2`, for dense or sparse (row) gradients."""
    if grad is None:  # the parameter does not influence this output
        return
    if grad.is_sparse:
        grad = grad.coalesce()  # a token seen twice: its row's gradients add up first
        acc.index_add_(0, grad.indices()[0], grad.values().float().square(), alpha=weight)
    else:
        acc.add_(grad.float().square(), alpha=weight)


def log_likelihood_terms(outputs: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """`(log p(y|x), p(y|x))` for every class `y` of one example's outputs `[classes]`, so that
    `sum p * grad(log p)^2` is the exact Fisher of the predicted distribution. A single output
    is a regression (GLUE's STS-B): under a unit-variance Gaussian around the prediction `f`,
    the expected squared score is `grad(f)^2`, so the term is `(f, 1)`."""
    if outputs.shape[-1] == 1:
        return [(outputs[0], 1.0)]
    log_probs = torch.log_softmax(outputs, dim=-1)
    probs = log_probs.detach().exp()
    return [(log_probs[y], float(probs[y])) for y in range(outputs.shape[-1])]


def diagonal_fisher(
    data: InputsOnly,
    model: nn.Module,
    keys: list[str],
    task: str,
    split: Split,
    num_examples: int | None,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean over examples of `sum_y p(y|x) grad(log p(y|x))^2` for the parameters `keys`."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in keys)
    wanted = [params[k] for k in keys]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in wanted]
    examples = 0
    batches = data.batches(task, split, num_examples, batch_size, device)
    with sparse_embedding_grads(model):
        for batch in track(batches, f"fisher: {task}", enabled=progress, unit="batch"):
            for i in range(batch_size_of(batch)):
                example = {k: v[i : i + 1] for k, v in batch.items()}
                outputs = data.logits(model, example).float()[0]
                for value, weight in log_likelihood_terms(outputs):
                    grads = torch.autograd.grad(value, wanted, retain_graph=True, allow_unused=True)
                    for acc, grad in zip(fisher, grads, strict=True):
                        add_squared(acc, grad, weight)
                examples += 1
    if examples == 0:
        raise MergeBenchError(f"fisher: task {task!r} has no {split} inputs")
    return {k: f / examples for k, f in zip(keys, fisher, strict=True)}, examples


def above_zero(where: str, given: Any, value: float, earlier: Mapping[str, Any]) -> None:
    if not value > 0:
        raise MergeBenchError(f"{where}: {given!r} must be > 0")


class Fisher(Method):
    name = "fisher"
    needs_data = True

    num_examples: int | None = option(integer, allow_none=True)
    min_fisher: float = option(number, also=above_zero)
    normalize: bool = option(flag)
    batch_size: int = option(integer)
    split: str = option(choice, allowed=("train", "validation"))

    def merge(self, pool: ModelPool, context: RunContext = DEFAULT_CONTEXT) -> SingleModelResult:
        data = inputs_only(pool, self.name)
        plan = plan_keys(pool)
        device = torch.device(context.device)
        probe = data.build_model(pool.tasks[0])
        param_names = {name for name, _ in probe.named_parameters()}
        del probe
        keys = [k for k in plan.merged if k in param_names]  # buffers have no gradient
        numerator = {k: torch.zeros(pool.pretrained.shape(k), device=device) for k in keys}
        denominator = {k: torch.zeros(pool.pretrained.shape(k), device=device) for k in keys}
        norms: dict[str, float] = {}
        for task in track(pool.tasks, "fisher", enabled=context.progress, unit="task", every=1):
            model = load_task_model(pool, data, task, device, self.name)
            fisher, _ = diagonal_fisher(
                data,
                model,
                keys,
                task,
                self.split,
                self.num_examples,
                self.batch_size,
                device,
                context.progress,
            )
            norm = torch.sqrt(sum(f.double().square().sum() for f in fisher.values())).item()
            norms[task] = norm
            params = dict(model.named_parameters())
            for key in keys:
                value = fisher.pop(key)
                if self.normalize and norm > 0:
                    value = value / norm
                value = value.clamp(min=self.min_fisher)
                numerator[key] += value * params[key].detach().float()
                denominator[key] += value
            del model, params

        stream = TaskVectorStream(pool, plan, device=device, progress=context.progress)
        shared: dict[str, torch.Tensor] = {}
        for item in stream.passes(self.name):
            if item.key in numerator:
                value = numerator.pop(item.key) / denominator.pop(item.key)
            else:
                value = item.pretrained + item.task_vectors.mean(dim=0)
            shared[item.key] = value.to(item.dtype).cpu()
        result = single_result(self, pool, plan, shared)
        result.extra = {
            "fisher_norms": norms,
            "averaged_without_fisher": [k for k in plan.merged if k not in set(keys)],
        }
        return result
