"""EMR and "X w/ M&R" into an artifact span by span (`engine.spans`): a float32 pool on
the CPU.

Bit for bit the stream's EMR (`EMR.merge` through `modulate_key`): the same units (whole
keys, and row blocks of keys above `stream.REUSE_MAX_NUMEL`), the same chunks of the float64
rescaler sums. The span kernel (`kernels.emr_span`) stores each chunk's pairwise sum; once a
unit's spans are done, `kernels.add_chunk_sums` adds them in `modulate`'s order, and the
units' statistics are added up in unit order, as `assemble_result` does.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from mergebench.engine import kernels
from mergebench.engine import spans as span_pass
from mergebench.engine import stream as stream_module
from mergebench.engine.pool import ModelPool
from mergebench.engine.reader import TensorReader
from mergebench.engine.safetensors_reader import SafetensorsReader
from mergebench.engine.spans import (
    Span,
    SpanBuffers,
    run_spans,
    spans_of,
    stored_sources,
    whole_keys,
)
from mergebench.engine.stream import TaskVectorStream, row_blocks_of
from mergebench.methods import modulators
from mergebench.methods.base import Method
from mergebench.methods.modulators import (
    RescalerAccumulator,
    conditioned_result,
    modulator_writers,
)
from mergebench.results import ArtifactTarget, TaskConditionedResult
from mergebench.results.artifact import background_digest
from mergebench.results.shards import writing

_ELECTIONS = {"max": kernels.ELECT_MAX, "sum": kernels.ELECT_SUM}
_CHUNK = kernels.CAST_CHUNK  # the float64 sums' chunk; a span holds whole ones


def stream_units(stream: TaskVectorStream) -> list[tuple[str, int, int]]:
    """`(key, first, stop)` entry ranges of the units `EMR.merge`'s stream pass takes:
    whole keys, and row blocks of keys above `REUSE_MAX_NUMEL` (`small_blocks=False`)."""
    units = []
    for key in stream.plan.merged:
        shape = tuple(stream.pool.pretrained.shape(key))
        numel = math.prod(shape)
        blocks = row_blocks_of(shape, stream_module.REUSE_MAX_NUMEL)
        if blocks is None:
            units.append((key, 0, numel))
            continue
        row = numel // shape[0]
        units.extend((key, start * row, stop * row) for start, stop in blocks)
    return units


def emr_spans(
    method: Method,
    pool: ModelPool,
    stream: TaskVectorStream,
    target: ArtifactTarget,
    magnitude: str,
    mask: bool,
    rescale: bool,
    rescaler: str,
) -> TaskConditionedResult | None:
    """EMR with its election (`magnitude`) into `target`, or None when the pool is not
    float32 safetensors on the CPU (the stream's way then)."""
    sources = _float32_sources(pool, stream)
    if sources is None:
        return None
    return _modulate_spans(method, pool, stream, target, sources, stream_units(stream),
                           _ELECTIONS[magnitude], mask, rescale, rescaler)  # fmt: skip


def mask_rescale_spans(
    method: Method,
    pool: ModelPool,
    stream: TaskVectorStream,
    target: ArtifactTarget,
    base: TensorReader,
    mask: bool,
    rescale: bool,
    rescaler: str,
) -> TaskConditionedResult | None:
    """ "X w/ M&R" into `target` against the base model `base` (`tau_uni = W_X - W_pre` in
    float32, whole keys as `stream_mask_and_rescale` takes them), or None unless the pool
    and `base` are float32 safetensors (the stream's way then)."""
    sources = _float32_sources(pool, stream)
    if (
        sources is None
        or not isinstance(base, SafetensorsReader)
        or any(base.stored_dtype(key) != torch.float32 for key in stream.plan.merged)
    ):
        return None
    units = whole_keys(stream)
    return _modulate_spans(method, pool, stream, target, [*sources, base], units,
                           kernels.ELECT_NONE, mask, rescale, rescaler)  # fmt: skip


def _float32_sources(pool: ModelPool, stream: TaskVectorStream) -> list[SafetensorsReader] | None:
    sources = stored_sources(pool, stream, torch.float32)
    if sources is None or modulators.SUM_BLOCK % _CHUNK or span_pass.SPAN_NUMEL % _CHUNK:
        return None  # (a sum block of part of a chunk: tests that shrink it)
    return sources


def _modulate_spans(
    method: Method,
    pool: ModelPool,
    stream: TaskVectorStream,
    target: ArtifactTarget,
    sources: list[SafetensorsReader],
    units: list[tuple[str, int, int]],
    elect: int,
    mask: bool,
    rescale: bool,
    rescaler: str,
) -> TaskConditionedResult:
    """Mask & Rescale span by span: `sources` are the pretrained model, the N experts and,
    without an election (`elect` ELECT_NONE), the model whose difference to the pretrained
    one is `tau_uni`."""
    n = len(pool.tasks)
    spans = spans_of(units)
    statistics = _UnitSums(units, spans, n, mask, rescale, rescaler, stream)
    # The result's pretrained digest meanwhile: hashing the weights after the merge was a
    # serial 0.3 s of a 2 s ViT-B/32 merge.
    digest = background_digest(pool.pretrained, list(stream.plan.merged))
    unified_writer, masks_writer = modulator_writers(target, pool, stream.plan, mask)

    def work(piece: Span, buffers: SpanBuffers) -> None:
        rows = buffers.read(sources, piece)
        width = piece.width
        unified = buffers.get("unified", (width,), np.float32)
        if elect == kernels.ELECT_NONE:  # W_X - W_pre, as torch subtracts float32
            np.subtract(rows[n + 1], rows[0], out=unified)
        packed = buffers.get("packed", (n, (width + 7) // 8 if mask else 0), np.uint8)
        chunks = -(-width // _CHUNK)
        numerators = buffers.get("numerators", (n, chunks), np.float64)
        denominators = buffers.get("denominators", (n, chunks), np.float64)
        if width and not kernels.emr_span(rows[0], rows[1 : n + 1], elect, mask, rescale,
                                          unified, packed, numerators, denominators):  # fmt: skip
            raise stream._non_finite(piece.key)
        unified_writer.write_span(piece.key, torch.from_numpy(unified), piece.first)
        if masks_writer is not None:
            masks_writer.write_columns(piece.key, torch.from_numpy(packed), piece.first // 8)
        statistics.add(piece, numerators, denominators)

    with writing(unified_writer, masks_writer):
        kernels.warm_up()
        run_spans(stream, spans, work, method.name, len(sources), np.dtype(np.float32))
        accumulator = RescalerAccumulator(n, rescaler)
        for numerator, denominator in statistics.in_order():
            accumulator.numerator += torch.from_numpy(numerator)
            accumulator.denominator += torch.from_numpy(denominator)
    unified = target.tensors("unified")
    packed = target.tensors("masks") if mask else {}
    return conditioned_result(method, pool, stream.plan, unified, packed, accumulator, mask,
                              rescale, digest)  # fmt: skip


class _UnitSums:
    """Each unit's chunk sums as its spans come in (any order, any thread); once all are
    in, the unit's per-task statistics, added up as `modulate` and `_modulate_blocks` do."""

    def __init__(
        self,
        units: list[tuple[str, int, int]],
        spans: list[Span],
        tasks: int,
        mask: bool,
        rescale: bool,
        rescaler: str,
        stream: TaskVectorStream,
    ) -> None:
        self._units = units
        self._tasks, self._mask, self._rescale = tasks, mask, rescale
        self._mean = rescaler == "tensor_mean"
        self._sizes = [stream.numel(key) for key, _, _ in units]
        self._pending = [0] * len(units)  # spans not in yet, per unit
        for piece in spans:
            self._pending[piece.unit] += 1
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._done: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(units)
        self._lock = threading.Lock()

    def add(self, piece: Span, numerators: np.ndarray, denominators: np.ndarray) -> None:
        _, first, stop = self._units[piece.unit]
        count = -(-(stop - first) // _CHUNK)
        at, width = piece.offset // _CHUNK, numerators.shape[1]
        with self._lock:
            held = self._chunks.get(piece.unit)
            if held is None:
                held = self._chunks[piece.unit] = (
                    np.zeros((self._tasks, count)),
                    np.zeros((self._tasks, count)),
                )
            if self._rescale:
                held[0][:, at : at + width] = numerators
                held[1][:, at : at + width] = denominators
            self._pending[piece.unit] -= 1
            finished = self._pending[piece.unit] == 0
            if finished:
                del self._chunks[piece.unit]
        if finished:  # the unit's last span: add its chunks up (outside the lock)
            self._done[piece.unit] = self._unit_sums(piece.unit, *held)

    def _unit_sums(
        self, unit: int, numerators: np.ndarray, denominators: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        numerator, denominator = np.zeros(self._tasks), np.zeros(self._tasks)
        _, first, stop = self._units[unit]
        if not self._rescale or stop == first:
            return numerator, denominator
        per_block = modulators.SUM_BLOCK // _CHUNK
        kernels.add_chunk_sums(numerators, per_block, numerator)
        if self._mask:
            kernels.add_chunk_sums(denominators, per_block, denominator)
        else:  # one sum of |tau_uni| per block, added to every task's
            for start in range(0, numerators.shape[1], per_block):
                block = np.zeros(1)
                kernels.add_chunk_sums(denominators[:1, start : start + per_block], per_block,
                                       block)  # fmt: skip
                denominator += block[0]
        if self._mean:
            numerator /= self._sizes[unit]
            denominator /= self._sizes[unit]
        return numerator, denominator

    def in_order(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every unit's statistics, in unit order (all spans must be done)."""
        missing = [i for i, sums in enumerate(self._done) if sums is None]
        if missing:
            raise RuntimeError(f"emr spans: unit {self._units[missing[0]][0]!r} not finished")
        return [sums for sums in self._done if sums is not None]
