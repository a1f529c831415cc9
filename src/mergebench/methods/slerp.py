"""SLERP between exactly two fine-tuned models, per tensor, as mergekit's `slerp` (methods.md).

`A` (at t = 0) and `B` (at t = 1) are the two tasks, in `endpoints` order (default: the
pool's order); the pretrained model only supplies the copied keys. Per merged tensor, on
the flattened tensors: `a = A / ||A||`, `b = B / ||B||` (a norm `<= 1e-8` leaves the vector
as it is), `d = a . b`; `|d| > 0.9995`: `W = (1 - t) A + t B`; else `theta = arccos(d)` and
`W = sin((1 - t) theta) / sin(theta) A + sin(t theta) / sin(theta) B`. The sums are float64
(`d = (A . B) s_A s_B`, `s` = 1/norm or 1), the two coefficients float64 scalars, `W` float32
and handed back as `W - W_pre` (the driver adds `W_pre` again: within 1-2 ulp of `W`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TensorItem
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.options import number, option
from mergebench.util.errors import MergeBenchError

# mergekit's constants: above this |cosine| the two tensors count as colinear (lerp), and a
# norm at or below NORM_EPS is not divided by.
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
# Entries per float64 block of the sums.
_BLOCK = 1 << 16


def inverse_norm(norm: float) -> float:
    """The factor that normalizes a vector of this norm: `1 / norm`, or 1 at `norm <= 1e-8`."""
    return 1.0 / norm if norm > NORM_EPS else 1.0


def slerp_coefficients(d: float, t: float) -> tuple[float, float]:
    """`(c_A, c_B)` with `W = c_A A + c_B B`, from the cosine `d` of the (normalized) pair."""
    if abs(d) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(d)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def pair_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """`(||a||^2, ||b||^2, a . b)` as float64 sums, block by block (no float64 copy of a
    whole, possibly LLM-sized, tensor)."""
    x, y = a.reshape(-1), b.reshape(-1)
    sums = torch.zeros(3, dtype=torch.float64, device=a.device)
    for start in range(0, x.numel(), _BLOCK):
        xb = x[start : start + _BLOCK].to(torch.float64)
        yb = y[start : start + _BLOCK].to(torch.float64)
        sums += torch.stack([xb @ xb, yb @ yb, xb @ yb])
    aa, bb, ab = sums.tolist()
    return aa, bb, ab


def slerp_delta(
    pretrained: torch.Tensor, task_vectors: torch.Tensor, order: tuple[int, int], t: float
) -> torch.Tensor:
    """`W - W_pre` for one key: the two models are `W_pre + tau` (rows `order` of the stack)."""
    a = pretrained + task_vectors[order[0]]
    b = pretrained + task_vectors[order[1]]
    aa, bb, ab = pair_sums(a, b)
    d = ab * inverse_norm(math.sqrt(aa)) * inverse_norm(math.sqrt(bb))
    coef_a, coef_b = slerp_coefficients(d, t)
    return a.mul_(coef_a).add_(b, alpha=coef_b).sub_(pretrained)


def endpoint_names(method: str, option: str, value: Any) -> list[str] | None:
    """`endpoints`: null, or two different task names."""
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, str) and v for v in value)
        or value[0] == value[1]
    ):
        raise MergeBenchError(
            f"{method}.{option}: expected two different task names [A, B] or null, got {value!r}"
        )
    return list(value)


class Slerp(TaskVectorMethod):
    name = "slerp"

    # Checked in this order; `endpoints` is recorded as checked (a tuple as a list).
    endpoints: list[str] | None = option(endpoint_names, record_checked=True)
    t: float = option(number)

    def setup(self) -> None:
        self.order = (0, 1)

    def accept_pool(self, pool: ModelPool) -> None:
        tasks = list(pool.tasks)
        if len(tasks) != 2:
            raise MergeBenchError(
                f"{self.name}: merges exactly two fine-tuned models, got {len(tasks)} tasks "
                f"({', '.join(tasks)})"
            )
        if self.endpoints is not None:
            for name in self.endpoints:
                if name not in tasks:
                    raise MergeBenchError(
                        f"{self.name}.endpoints: {name!r} is not a task of the pool "
                        f"(tasks: {', '.join(tasks)})"
                    )
            self.order = (tasks.index(self.endpoints[0]), tasks.index(self.endpoints[1]))

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        # On the models themselves, not their task vectors: the item's pretrained is needed.
        return slerp_delta(item.pretrained, item.task_vectors, self.order, self.t)
