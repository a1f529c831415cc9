"""Task Arithmetic: `W = W_pre + lam * sum_t tau_t`."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from mergebench.engine import kernels
from mergebench.engine.pool import ModelPool
from mergebench.engine.safetensors_reader import SafetensorsReader
from mergebench.engine.spans import (
    Span,
    SpanBuffers,
    run_spans,
    spans_of,
    stored_sources,
    whole_keys,
)
from mergebench.engine.stream import TaskVectorStream, TensorItem, numpy_kernels, sum_tasks
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.options import number, option
from mergebench.results import ArtifactTarget, SingleModelResult
from mergebench.results.shards import ShardedWriter


class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    post_scaling = "scaling"

    scaling: float = option(number)

    def splits_rows(self) -> bool:
        return True  # entry by entry

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        if numpy_kernels(task_vectors) and task_vectors.is_contiguous():
            # One compiled pass: the task sum (task order) times float32(scaling), as torch.
            n = task_vectors.shape[0]
            out = np.empty(task_vectors[0].numel(), dtype=np.float32)
            rows = task_vectors.reshape(n, -1).numpy()
            kernels.scaled_task_sum(rows, np.float32(self.scaling), out)
            return torch.from_numpy(out).view(task_vectors.shape[1:])
        return self.scaling * sum_tasks(task_vectors)

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        # The stream has already summed the task vectors (task order) for its checks.
        return self.scaling * item.task_sum()

    def _merge_into(
        self, target: ArtifactTarget, pool: ModelPool, stream: TaskVectorStream
    ) -> SingleModelResult:
        """bf16 checkpoints into a bf16 artifact: the merged keys go straight from the files'
        bytes to the artifact's (`kernels.task_arithmetic_bf16`), bit for bit what the
        float32 stream writes; any other pool takes the stream."""
        sources = stored_sources(pool, stream, torch.bfloat16)
        if sources is not None:
            return self._write_artifact(
                target, pool, stream, lambda writer: self._write_bf16(stream, sources, writer)
            )
        transform = stream.transform_factory() if stream.transform_factory else None
        if transform is None or hasattr(transform, "philox_keys"):  # none, or DARE's drops
            floats = stored_sources(pool, stream, torch.float32, transformed=True)
            if floats is not None:
                return self._write_artifact(
                    target, pool, stream,
                    lambda writer: self._write_float32(stream, floats, writer, transform),
                )  # fmt: skip
        return super()._merge_into(target, pool, stream)

    def _write_float32(
        self,
        stream: TaskVectorStream,
        sources: list[SafetensorsReader],
        writer: ShardedWriter,
        dropper: Any,
    ) -> None:
        """Every merged key span by span (`engine.spans`) from float32 files: the task
        vectors, DARE's drops if `dropper` (a `dare.Dropper`), the task sum and the merged
        entries in one compiled pass (`kernels.task_arithmetic_span`), bit for bit the
        stream's."""
        units = whole_keys(stream)
        scaling = np.float32(self.scaling)
        drop = dropper is not None
        threshold = np.int64(dropper.threshold() if drop else 0)
        keep = dropper.keep() if drop else np.float32(1.0)
        rescale = bool(dropper.rescale) if drop else False
        no_keys = np.zeros((len(sources) - 1, 2), dtype=np.uint64)
        keys = functools.lru_cache(maxsize=64)(dropper.philox_keys) if drop else None

        def work(piece: Span, buffers: SpanBuffers) -> None:
            rows = buffers.read(sources, piece)
            out = buffers.get("merged", (piece.width,), np.float32)
            draws = keys(piece.key) if keys is not None else no_keys
            if piece.width and not kernels.task_arithmetic_span(
                rows[0], rows[1:], scaling, piece.first, drop, draws, threshold, rescale, keep,
                out,
            ):  # fmt: skip
                raise stream._non_finite(piece.key)
            writer.write_span(piece.key, torch.from_numpy(out), piece.first)

        kernels.warm_up()
        run_spans(stream, spans_of(units), work, self.name, len(sources), np.dtype(np.float32))

    def _write_bf16(
        self, stream: TaskVectorStream, sources: list[SafetensorsReader], writer: ShardedWriter
    ) -> None:
        """Every merged key span by span on the stream's workers (`engine.spans`): each
        reads the span of every checkpoint as bf16 bits, merges, and writes it."""
        units = whole_keys(stream)
        scaling = np.float32(self.scaling)

        def work(piece: Span, buffers: SpanBuffers) -> None:
            rows = buffers.read(sources, piece)
            out = buffers.get("merged", (piece.width,), np.uint16)
            if not kernels.task_arithmetic_bf16(rows[0], rows[1:], scaling, out):
                raise stream._non_finite(piece.key)
            writer.write_span(piece.key, torch.from_numpy(out).view(torch.bfloat16), piece.first)

        run_spans(stream, spans_of(units), work, self.name, len(sources), np.dtype(np.uint16))
