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

from mergebench.engine.keyplan import KeyPlan
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TensorItem, TransformFactory
from mergebench.methods.base import TaskVectorMethod, number
from mergebench.methods.model_stock import row_gram
from mergebench.results import SingleModelResult
from mergebench.util.errors import MergeBenchError

# mergekit's constants: above this |cosine| the two tensors count as colinear (lerp), and a
# norm at or below NORM_EPS is not divided by.
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


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


def slerp_pair(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of two float32 tensors of one shape (a new float32 tensor)."""
    gram = row_gram(torch.stack([a, b]).reshape(2, 1, -1))[0]
    scale_a = inverse_norm(math.sqrt(float(gram[0, 0])))
    scale_b = inverse_norm(math.sqrt(float(gram[1, 1])))
    coef_a, coef_b = slerp_coefficients(float(gram[0, 1]) * scale_a * scale_b, t)
    return coef_a * a + coef_b * b


def slerp_delta(
    pretrained: torch.Tensor, task_vectors: torch.Tensor, order: tuple[int, int], t: float
) -> torch.Tensor:
    """`W - W_pre` for one key: the two models are `W_pre + tau` (rows `order` of the stack)."""
    a = pretrained + task_vectors[order[0]]
    b = pretrained + task_vectors[order[1]]
    return slerp_pair(a, b, t).sub_(pretrained)


def endpoint_names(value: Any) -> list[str] | None:
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
            f"slerp.endpoints: expected two different task names [A, B] or null, got {value!r}"
        )
    return list(value)


class Slerp(TaskVectorMethod):
    name = "slerp"

    def __init__(self, t: Any, endpoints: Any) -> None:
        names = endpoint_names(endpoints)
        super().__init__(t=t, endpoints=names)
        self.t = number(self.name, "t", t)
        self.endpoints = names
        self.order = (0, 1)

    def merge(
        self,
        pool: ModelPool,
        transform_factory: TransformFactory | None = None,
        plan: KeyPlan | None = None,
    ) -> SingleModelResult:
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
        return super().merge(pool, transform_factory, plan)

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        # On the models themselves, not their task vectors: the item's pretrained is needed.
        return slerp_delta(item.pretrained, item.task_vectors, self.order, self.t)
