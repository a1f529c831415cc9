""" "X w/ M&R": run method X, take `tau_uni = W_X - W_pre`, then Mask and Rescale as EMR does."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from mergebench.engine.keyplan import plan_keys
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TaskVectorStream, TensorItem
from mergebench.methods.base import DEFAULT_CONTEXT, Method, RunContext
from mergebench.methods.modulators import RESCALERS, stream_mask_and_rescale
from mergebench.methods.options import choice, flag
from mergebench.methods.registry import build_method, method_label
from mergebench.results import MergeResult, SingleModelResult, TaskConditionedResult
from mergebench.util.errors import MergeBenchError


class MaskRescale(Method):
    name = "mask_rescale"
    task_conditioned = True

    label_options = ("base",)

    @classmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        """`<base label> w/ M&R` (paper Table 7), e.g. `ties w/ M&R`, `adamerging++ w/ M&R`."""
        return f"{cls.base_label(params)} w/ M&R"

    @classmethod
    def base_label(cls, params: Mapping[str, Any]) -> str:
        return method_label(str(params.get("base")), params.get("base_params") or {})

    def __init__(
        self,
        base: str,
        mask: Any,
        rescale: Any,
        rescaler: str,
        base_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            base=base,
            mask=mask,
            rescale=rescale,
            rescaler=rescaler,
            base_params=dict(base_params or {}),
        )
        self.mask = flag(self.name, "mask", mask)
        self.rescale = flag(self.name, "rescale", rescale)
        self.rescaler = choice(self.name, "rescaler", rescaler, RESCALERS)
        self.base = build_method(base, **(base_params or {}))
        if self.base.task_conditioned:
            raise MergeBenchError(
                f"{self.name}.base: {base!r} is task-conditioned; M&R needs a single-model method"
            )

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return self.base.needs_data

    def merge(
        self, pool: ModelPool, context: RunContext = DEFAULT_CONTEXT
    ) -> TaskConditionedResult:
        in_memory = replace(context, target=None)
        if context.target is None or self.base.needs_data:
            return self._mask_and_rescale(pool, self.base.merge(pool, in_memory), context)
        # Streamed: the base model goes to a scratch folder and is read back key by key.
        with context.target.scratch() as scratch:
            merged = self.base.merge(pool, replace(context, target=scratch))
            return self._mask_and_rescale(pool, merged, context)

    def _mask_and_rescale(
        self, pool: ModelPool, merged: MergeResult, context: RunContext
    ) -> TaskConditionedResult:
        assert isinstance(merged, SingleModelResult)
        stream = TaskVectorStream(pool, plan_keys(pool), device=context.device,
                                  progress=context.progress)  # fmt: skip

        def unify(item: TensorItem) -> torch.Tensor:
            base = merged.shared[item.key].to(item.pretrained.device, item.pretrained.dtype)
            return base - item.pretrained

        # Keys in parallel through the streaming engine (see stream.map).
        result = stream_mask_and_rescale(
            self, pool, stream, unify, self.mask, self.rescale, self.rescaler, context.target
        )
        result.extra["base_extra"] = merged.extra
        return result
