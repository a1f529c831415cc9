"""EMR-Merging: Elect a unified task vector, then per-task Masks and Rescalers (methods.md).

Elect, per entry: `gamma = sgn(sum_t tau_t)` (-1 where the sum is 0), `eps = max |tau_t|`
over the tasks whose `tau_t` agrees with `gamma` (0 if none), `tau_uni = gamma * eps`.
`magnitude=sum` takes `eps = sum |tau_t|` over the agreeing tasks instead, as the official
BEiT-3 script does (methods.md). Ablations: `elect=false` uses the plain mean of the task
vectors, `mask=false` uses `M_t = 1`, `rescale=false` uses `lam_t = 1`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergebench.engine.keyplan import plan_keys
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TaskVectorStream, TensorItem, numpy_kernels, sum_tasks
from mergebench.methods.base import DEFAULT_CONTEXT, Method, RunContext
from mergebench.methods.emr_spans import emr_spans
from mergebench.methods.modulators import (
    RESCALERS,
    KeyModulators,
    Scratch,
    assemble_result,
    modulate_key,
    thread_scratch,
)
from mergebench.methods.options import choice, flag, option
from mergebench.results import TaskConditionedResult

MAGNITUDES = ("max", "sum")


def elect(
    task_vectors: torch.Tensor,
    task_sum: torch.Tensor | None = None,
    scratch: Scratch | None = None,
    magnitude: str = "max",
) -> torch.Tensor:
    """`tau_uni = gamma * eps` with `gamma = sgn(sum_t tau_t)`, `eps` the largest agreeing |tau_t|
    (`magnitude="sum"`: their sum, see `elect_sum`).

    Computed without `[N, ...]` temporaries: where gamma = +1 (sum > 0) some tau_t is
    positive and `tau_uni = max_t tau_t`; where gamma = -1, `tau_uni = min_t tau_t` if that
    is negative, else no task agrees and `tau_uni = -1 * 0 = -0.0` (bit for bit the formula).
    Work buffers come from `scratch` when given; only the result is a new tensor.
    """
    shape, device = task_vectors.shape[1:], task_vectors.device

    def buffer(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if scratch is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return scratch.get(name, shape, dtype, device)

    total = task_sum
    if total is None:
        total = torch.sum(task_vectors, dim=0, out=buffer("elect_sum"))
    if magnitude == "sum":
        positive = buffer("elect_positive", torch.bool)
        flag, work = buffer("elect_flag"), buffer("elect_sum_work")
        return elect_sum(task_vectors, total, positive, flag, work)
    high = torch.amax(task_vectors, dim=0, out=buffer("elect_high"))
    low = torch.amin(task_vectors, dim=0, out=buffer("elect_low"))
    return _select_unified(total, high, low, buffer("elect_work", torch.int32))


_SIGN_BIT = -(2**31)  # int32 with only the sign bit set: the bits of -0.0


def _select_unified(
    total: torch.Tensor, high: torch.Tensor, low: torch.Tensor, work: torch.Tensor
) -> torch.Tensor:
    """`high` where `total > 0`, else `low` if `low < 0`, else -0.0, on float32 bits.

    Same result as two `torch.where`s, but branch-free integer ops: `where` on a random
    condition runs ~10x slower per entry on CPU (branch mispredictions). A float32 is
    > 0 exactly when its int32 bits are > 0, and < 0 or -0.0 exactly when its sign bit is
    set. `high` and `work` are overwritten.
    """
    t = total.contiguous().view(torch.int32)
    h = high.view(torch.int32)
    lo = low.contiguous().view(torch.int32)
    out = torch.empty_like(t)
    # positive = all ones where total > 0, else 0: (~t & -t) has its sign bit set iff t > 0.
    torch.bitwise_not(t, out=work)
    work.bitwise_and_(torch.neg(t, out=out)).bitwise_right_shift_(31)
    # negative = low where its sign bit is set, else -0.0: (low & (low >> 31)) | sign bit.
    torch.bitwise_right_shift(lo, 31, out=out)
    out.bitwise_and_(lo).bitwise_or_(_SIGN_BIT)
    # chosen = negative ^ ((negative ^ high) & positive)
    out.bitwise_xor_(h.bitwise_xor_(out).bitwise_and_(work))
    return out.view(torch.float32)


def elect_sum(
    task_vectors: torch.Tensor,
    total: torch.Tensor,
    positive: torch.Tensor,
    flag: torch.Tensor,
    work: torch.Tensor,
) -> torch.Tensor:
    """The official BEiT-3 election: `flag = (total > 0) * 2 - 1`, `eps` the sum over tasks,
    in task order, of `|tau_t|` where `tau_t * flag > 0`, `tau_uni = eps * flag`.

    `tau_t * flag` is exact (flag is +-1), so `max(tau_t * flag, 0)` is the agreeing |tau_t|
    or 0; where no task agrees `tau_uni = 0 * -1 = -0.0`, as in that script. `positive`,
    `flag` and `work` are overwritten; only the result is a new tensor.
    """
    flag.copy_(torch.gt(total, 0, out=positive)).mul_(2).sub_(1)
    eps = torch.zeros_like(flag)
    for tau in task_vectors:
        eps.add_(torch.mul(tau, flag, out=work).clamp_min_(0))
    return eps.mul_(flag)


class EMR(Method):
    name = "emr"
    task_conditioned = True

    label_options = ("elect", "mask", "rescale", "rescaler", "magnitude")

    @classmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        """`emr`, or the ablation of paper Table 8 it is: `emr (elect)`, `emr (elect+mask)`,
        `emr (elect+rescale)`; `emr (mean)` without the election; `emr (global)` for
        Algorithm 1's rescaler; `sum` last for the BEiT-3 election (`emr (sum)`)."""
        mask, rescale = bool(params.get("mask", True)), bool(params.get("rescale", True))
        if not params.get("elect", True):  # no election: `magnitude` plays no part
            return "emr (mean)" if mask or rescale else "emr (mean only)"
        parts = []
        if mask and rescale:
            rescaler = params.get("rescaler", "tensor_mean")
            parts += [] if rescaler == "tensor_mean" else [str(rescaler)]
        else:
            parts.append("+".join(["elect"] + ["mask"] * mask + ["rescale"] * rescale))
        parts += ["sum"] if params.get("magnitude", "max") == "sum" else []
        return f"emr ({', '.join(parts)})" if parts else "emr"

    elect: bool = option(flag)
    mask: bool = option(flag)
    rescale: bool = option(flag)
    rescaler: str = option(choice, allowed=RESCALERS)
    magnitude: str = option(choice, allowed=MAGNITUDES)

    def unify(
        self,
        task_vectors: torch.Tensor,
        task_sum: torch.Tensor | None = None,
        scratch: Scratch | None = None,
    ) -> torch.Tensor:
        if self.elect:
            return elect(task_vectors, task_sum, scratch, self.magnitude)
        return sum_tasks(task_vectors) / task_vectors.shape[0]  # the `elect=false` ablation

    def merge(
        self, pool: ModelPool, context: RunContext = DEFAULT_CONTEXT
    ) -> TaskConditionedResult:
        stream = TaskVectorStream(pool, plan_keys(pool), device=context.device,
                                  progress=context.progress)  # fmt: skip
        if context.target is not None and self.elect and numpy_kernels(torch.empty(0)):
            # Files to artifact: span by span straight from float32 files, if they are.
            spans = emr_spans(self, pool, stream, context.target, self.magnitude, self.mask,
                              self.rescale, self.rescaler)  # fmt: skip
            if spans is not None:
                return spans

        def per_key(item: TensorItem) -> KeyModulators:
            taus, scratch = item.task_vectors, thread_scratch()
            # Everything but the rescaler sums goes entry by entry: a big key may come in
            # row blocks, whose sums (over the whole key's size) add up.
            where = {"rows": item.rows, "size": stream.numel(item.key)}
            if self.elect and numpy_kernels(taus):  # elected in the same compiled pass
                return modulate_key(
                    taus, None, self.mask, self.rescaler, scratch, self.rescale,
                    elect=self.magnitude, **where,
                )  # fmt: skip
            unified = self.unify(taus, item.task_sum(), scratch)
            return modulate_key(
                taus, unified, self.mask, self.rescaler, scratch, self.rescale, **where
            )

        # Blocks only above the reused buffers' size: the rescalers' float64 sums per block
        # keep the grouping they had (smaller blocks would move their last bits).
        keys = stream.map(per_key, self.name, row_blocks=True, small_blocks=False)
        return assemble_result(
            self, pool, stream.plan, keys, self.mask, self.rescale, self.rescaler, context.target
        )
