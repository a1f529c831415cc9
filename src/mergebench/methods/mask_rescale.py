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
from mergebench.methods.emr_spans import mask_rescale_spans
from mergebench.methods.modulators import RESCALERS, stream_mask_and_rescale
from mergebench.methods.options import choice, flag, method_name, option, params_mapping
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

    base: str = option(method_name)  # setup() builds it
    mask: bool = option(flag)
    rescale: bool = option(flag)
    rescaler: str = option(choice, allowed=RESCALERS)
    base_params: dict[str, Any] = option(params_mapping, record_checked=True)

    def setup(self) -> None:
        self.base_method = build_method(self.base, **self.base_params)
        if self.base_method.task_conditioned:
            raise MergeBenchError(
                f"{self.name}.base: {self.base!r} is task-conditioned; M&R needs a "
                "single-model method"
            )

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return self.base_method.needs_data

    def merge(
        self, pool: ModelPool, context: RunContext = DEFAULT_CONTEXT
    ) -> TaskConditionedResult:
        in_memory = replace(context, target=None)
        if context.target is None or self.base_method.needs_data:
            return self._mask_and_rescale(pool, self.base_method.merge(pool, in_memory), context)
        # Streamed: the base model goes to a scratch folder and is read back key by key.
        with context.target.scratch() as scratch:
            merged = self.base_method.merge(pool, replace(context, target=scratch))
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

        result = None
        base = getattr(merged.shared, "source", None)  # a streamed base: its files
        if context.target is not None and base is not None:  # float32 files: span by span
            result = mask_rescale_spans(self, pool, stream, context.target, base, self.mask,
                                        self.rescale, self.rescaler)  # fmt: skip
        if result is None:  # keys in parallel through the streaming engine (stream.map)
            result = stream_mask_and_rescale(
                self, pool, stream, unify, self.mask, self.rescale, self.rescaler,
                context.target,
            )  # fmt: skip
        result.extra["base_extra"] = merged.extra
        return result
