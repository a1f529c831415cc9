"""WUDI merging: a data-free least-squares fit of one matrix to all task vectors (methods.md).

For each matrix whose key fully matches `keys` (`re.fullmatch`), independently of every
other matrix: start from `tau_m = sum_t tau_t` (float32, task order) and take `steps`
full-batch Adam steps (betas 0.9/0.999, eps 1e-8, no weight decay, `lr`) on

    L(tau_m) = sum_t ||(tau_m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2,

then `W = W_pre + tau_m`. Every other merged tensor: `W_pre` (`others=pretrained`, the
official code) or `W_pre + mean_t tau_t` (`others=mean`, FusionBench).

How it is computed (the same numbers as autograd on the formula, up to float32 rounding):
- With `G_t = tau_t^T tau_t` (`n x n`) and `S = sum_t tau_t`, the gradient at
  `tau_m = S + D` is `2 (R0 + D A)` with `A = sum_t G_t / ||tau_t||^2` and
  `R0 = sum_t (S - tau_t) G_t / ||tau_t||^2`, both computed once: a step costs one
  `m x n x n` product whatever `N` (autograd on the formula costs about `4 N m^2 n`).
  Adam runs on the offset `D` (the same updates as on `tau_m`), so the gradient carries
  no cancellation of large terms (with one task it is exactly 0, as the formula's is;
  the expanded `2 (tau_m A - sum_t tau_t G_t / ||tau_t||^2)` would leave rounding noise
  there, which Adam's normalisation blows up to steps of size `lr`).
- Rows are independent: row `i` of the gradient is `2 (R0_i + D_i A)`, so a row with
  `R0_i = 0` keeps `D_i = 0` (gradient, moments and steps exactly 0) and is not fitted at
  all; only the other rows enter the per-step product. This is exact for the skipped rows
  (their `tau_m` row is `S_i`, bit for bit); the fitted rows see the same arithmetic on a
  smaller matrix (equal up to the BLAS's float32 summation order). It pays on embedding
  tables: the MiniLM zoo's word embeddings have 11,460 of 30,522 rows that any task moved.
- Adam is written out (`_adam_step`): the formula of `torch.optim.Adam`'s single-tensor
  path with its defaults (no amsgrad, no weight decay), so runs are deterministic on a CPU;
  the step reuses scratch buffers (no allocation per step, the same operations).
- A task vector that is zero on a matrix has no term (its term is `0 / 0`; the numerator
  is zero for any `tau_m`, so we define the term as 0). If every task vector is zero the
  gradient is zero and `tau_m` stays 0.
- The loss history (before each step, and after the last) is the exact quadratic
  `L(S + D) = L(S) + <2 R0 + D A, D>`, reductions in float64. `merge` records the first
  and last value per key in `result.extra["loss"]` and computes only those two
  (`history=False`); `wudi_matrix` returns the whole history by default.
- Cost: a step is one `m' x n x n` product (`m'` the fitted rows) plus a few elementwise
  passes, so a ViT-S/MiniLM pass is bound by float32 matrix products (docs/performance.md,
  "Data-free methods on the default boards"); keys run in parallel on the stream's workers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from mergebench.engine.stream import sum_tasks
from mergebench.methods.base import DEFAULT_CONTEXT, RunContext, TaskVectorMethod
from mergebench.methods.options import choice, number, option
from mergebench.methods.svd_utils import is_matrix
from mergebench.util.errors import MergeBenchError

if TYPE_CHECKING:
    from mergebench.engine.keyplan import KeyPlan
    from mergebench.engine.pool import ModelPool
    from mergebench.engine.stream import TransformFactory
    from mergebench.results import SingleModelResult

OTHERS = ("pretrained", "mean")
BETAS = (0.9, 0.999)
EPS = 1e-8


def _adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    denom: torch.Tensor | None = None,
) -> None:
    """One in-place Adam update (`torch.optim.Adam`, single-tensor path, default options).
    `denom`: an optional scratch tensor of `param`'s shape (no allocation per step)."""
    beta1, beta2 = BETAS
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = torch.sqrt(exp_avg_sq, out=denom).div_(math.sqrt(1 - beta2**step)).add_(EPS)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _constant_terms(
    task_vectors: torch.Tensor, start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(A, R0, L(S))` of the module doc, each computed once per matrix."""
    n_tasks, m, n = task_vectors.shape
    like = dict(dtype=task_vectors.dtype, device=task_vectors.device)
    a = torch.zeros((n, n), **like)  # A = sum_t G_t / ||tau_t||^2
    r0 = torch.zeros((m, n), **like)  # R0 = sum_t (S - tau_t) G_t / ||tau_t||^2
    loss0 = torch.zeros((), dtype=torch.float64, device=task_vectors.device)
    for t in range(n_tasks):
        tau = task_vectors[t]
        sq_norm = float(torch.sum(tau * tau, dtype=torch.float64))
        if sq_norm == 0.0:
            continue  # a zero task vector has no term (see the module doc)
        gram = tau.T @ tau
        weight = 1.0 / sq_norm
        a.add_(gram, alpha=weight)
        others = start - tau  # the other tasks' sum: exactly 0 when N = 1
        term = others @ gram
        r0.add_(term, alpha=weight)
        loss0 += torch.sum(term * others, dtype=torch.float64) * weight
    return a, r0, loss0


def wudi_matrix(
    task_vectors: torch.Tensor, steps: int, lr: float, history: bool = True
) -> tuple[torch.Tensor, list[float]]:
    """`(tau_m, losses)` for a stack of matrices `[N, m, n]`: the merged task vector after
    `steps` Adam steps and the loss before each step and after the last (`steps + 1`;
    with `history=False` only the first and the last, the same two numbers)."""
    start = sum_tasks(task_vectors)  # S = sum_t tau_t
    a, r0, loss0 = _constant_terms(task_vectors, start)
    # Rows are independent (row i of the gradient is 2 (R0_i + D_i A)) and a row with
    # R0_i = 0 never leaves D_i = 0: its gradient, moments and steps are exactly 0. Fit only
    # the other rows (an embedding table's untouched tokens cost nothing).
    active = r0.ne(0).any(dim=1).nonzero().squeeze(1)
    rows = None if len(active) == r0.shape[0] else active
    if rows is not None:
        r0 = r0[rows]
    # Adam on the offset D = tau_m - S (same steps as on tau_m itself): the gradient
    # 2 (R0 + D A) and the loss L(S) + <2 R0 + D A, D> carry no cancellation of large terms.
    offset = torch.zeros_like(r0)
    exp_avg, exp_avg_sq = torch.zeros_like(r0), torch.zeros_like(r0)
    grad, scratch = torch.empty_like(r0), torch.empty_like(r0)
    twice_r0 = r0 * 2  # exact
    losses = []
    for step in range(steps + 1):
        torch.mm(offset, a, out=grad)  # D A
        if history or step in (0, steps):
            torch.add(twice_r0, grad, out=scratch).mul_(offset)
            losses.append(loss0 + torch.sum(scratch, dtype=torch.float64))
        if step == steps:
            break
        grad.add_(r0).mul_(2)  # 2 (R0 + D A)
        _adam_step(offset, grad, exp_avg, exp_avg_sq, step + 1, lr, denom=scratch)
    merged = start.add_(offset) if rows is None else start.index_add_(0, rows, offset)
    return merged, torch.stack(losses).tolist()


def steps_option(name: str, option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeBenchError(f"{name}.{option}: {value!r} is not an integer")
    if not (math.isfinite(value) and value == int(value) and value >= 0):
        raise MergeBenchError(f"{name}.{option}: {value!r} is not an integer >= 0")
    return int(value)


def positive(where: str, given: Any, value: float, earlier: Mapping[str, Any]) -> None:
    if value <= 0:
        raise MergeBenchError(f"{where}: {value} must be > 0")


def regex(name: str, option: str, value: Any) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise MergeBenchError(f"{name}.{option}: {value!r} is not a regex string")
    try:
        return re.compile(value)
    except re.error as error:
        raise MergeBenchError(f"{name}.{option}: {value!r} is not a regex ({error})") from None


class WUDI(TaskVectorMethod):
    name = "wudi"

    steps: int = option(steps_option)
    lr: float = option(number, also=positive)
    keys: re.Pattern[str] = option(regex)
    others: str = option(choice, allowed=OTHERS)

    def setup(self) -> None:
        self._losses: dict[str, dict[str, float]] = {}

    def optimised(self, key: str, task_vectors: torch.Tensor) -> bool:
        """Whether `key` is one of the matrices WUDI fits (the rest follow `others`)."""
        return is_matrix(task_vectors) and self.keys.fullmatch(key) is not None

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        if self.optimised(key, task_vectors):
            merged, losses = wudi_matrix(task_vectors, self.steps, self.lr, history=False)
            self._losses[key] = {"start": losses[0], "end": losses[-1]}  # one entry per key
            return merged
        if self.others == "mean":
            return sum_tasks(task_vectors) / task_vectors.shape[0]
        return torch.zeros(task_vectors.shape[1:], dtype=task_vectors.dtype,
                           device=task_vectors.device)  # fmt: skip

    def merge(
        self,
        pool: ModelPool,
        context: RunContext = DEFAULT_CONTEXT,
        transform_factory: TransformFactory | None = None,
        plan: KeyPlan | None = None,
    ) -> SingleModelResult:
        self._losses = {}
        result = super().merge(pool, context, transform_factory, plan)
        result.extra["loss"] = {k: self._losses[k] for k in sorted(self._losses)}
        return result
