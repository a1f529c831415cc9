"""DARE: drop each task-vector entry with probability p, rescale the kept ones by 1/(1-p),
then hand the task vectors to a data-free base method.

Randomness: one `torch.Generator` per task, seeded by `seed` and the task index, consumed
tensor by tensor in key order, so a run is reproducible bit for bit (and replays exactly
in every pass a base method makes, e.g. TIES' global top-k).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TaskVectorTransform
from mergebench.methods.base import DEFAULT_CONTEXT, Method, RunContext, TaskVectorMethod
from mergebench.methods.options import flag, fraction, method_name, option, params_mapping
from mergebench.methods.registry import build_method, method_label
from mergebench.results import SingleModelResult
from mergebench.util.errors import MergeBenchError

# Large odd constant: seeds for different tasks never collide for any practical `seed`.
_TASK_STRIDE = 1_000_003


def drop_and_rescale(
    task_vector: torch.Tensor, p: float, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    keep = torch.rand(task_vector.shape, generator=generator) >= p  # P(keep) = 1 - p
    dropped = task_vector * keep.to(task_vector.device)
    return dropped / (1.0 - p) if rescale else dropped


def make_dropper(num_tasks: int, p: float, rescale: bool, seed: int) -> TaskVectorTransform:
    generators = [
        torch.Generator().manual_seed(seed * _TASK_STRIDE + index) for index in range(num_tasks)
    ]

    def transform(key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [
                drop_and_rescale(tau, p, rescale, g)
                for tau, g in zip(task_vectors, generators, strict=True)
            ]
        )

    return transform


def any_integer(method: str, option: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MergeBenchError(f"{method}.{option}: {value!r} is not an integer")
    return value


class Dare(Method):
    name = "dare"

    label_options = ("base",)

    @classmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        """`dare (<base label>)`, e.g. `dare (ties)`."""
        return f"dare ({method_label(str(params.get('base')), params.get('base_params') or {})})"

    base: str = option(method_name)  # setup() builds it
    drop: float = option(fraction, low_open=False, high_open=True)
    rescale: bool = option(flag)
    seed: int = option(any_integer)
    base_params: dict[str, Any] = option(params_mapping, record_checked=True)

    def setup(self) -> None:
        base = build_method(self.base, **self.base_params)
        if not isinstance(base, TaskVectorMethod):
            raise MergeBenchError(
                f"{self.name}.base: {self.base!r} is not a data-free single-model method "
                "(use task_arithmetic, ties or weight_averaging)"
            )
        self.base_method = base

    def merge(self, pool: ModelPool, context: RunContext = DEFAULT_CONTEXT) -> SingleModelResult:
        n = len(pool.tasks)
        result = self.base_method.merge(
            pool, context, transform_factory=lambda: make_dropper(n, self.drop, self.rescale,
                                                                  self.seed)
        )  # fmt: skip
        result.method, result.params = self.name, dict(self.params)
        return result
