"""Files-to-artifact passes span by span: each worker reads about a MiB of every checkpoint,
merges it in a compiled kernel while it sits in the cache, and writes the result.

The stream (`engine.stream`) reads a whole key (or a 4M-entry row block) of every checkpoint
into float32 buffers, subtracts, then hands the stack to the method: each step goes through
memory once more. A method whose outputs are entry by entry (and whose float sums can be
re-grouped exactly, see `kernels.emr_span`) can instead take spans of `SPAN_NUMEL` entries
straight from the safetensors files as stored (`SafetensorsReader.read_stored`: one
positional read per checkpoint, no staging) on the stream's worker threads, the way task
arithmetic's bf16 path does (docs/performance.md, "The ViT-B/32 pool span by span").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from mergebench.engine.pool import ModelPool
from mergebench.engine.safetensors_reader import SafetensorsReader
from mergebench.engine.stream import TaskVectorStream, numpy_kernels
from mergebench.engine.views import DtypeView
from mergebench.util.buffers import huge_page_array
from mergebench.util.progress import stage

# Entries per span: N + 1 reads of 1 MiB (float32). Fewer, larger spans cost less in
# calls, thread hand-offs and syscalls than they lose in cache: an EMR merge of the
# ViT-B/32 pool took 4.8 CPU s with 2^16, 3.8 with 2^18, 3.5-3.8 with 2^20 (load 3-5).
SPAN_NUMEL = 1 << 18
# False sends every merge through the stream (tests compare the two ways with it).
ENABLED = True


@dataclass(frozen=True)
class Span:
    """Entries `first : stop` (flat, row-major) of `key`; `unit` numbers the stream unit
    (a key, or a row block of one) the span belongs to, `offset` its first entry within it."""

    key: str
    first: int
    stop: int
    unit: int
    offset: int

    @property
    def width(self) -> int:
        return self.stop - self.first


def stored_sources(
    pool: ModelPool, stream: TaskVectorStream, dtype: torch.dtype, transformed: bool = False
) -> list[SafetensorsReader] | None:
    """The safetensors files of the pretrained model and the experts, if every merged key
    is stored as `dtype` in all of them and goes out as `dtype` (a `DtypeView` only declares
    the output dtype), on the CPU, untransformed (unless the caller applies the stream's
    transform itself: `transformed`); else None (the stream's way then)."""
    if (
        not ENABLED
        or stream.device.type != "cpu"
        or (stream.transform_factory is not None and not transformed)
        or not numpy_kernels(torch.empty(0))
    ):
        return None
    readers = []
    for source in (pool.pretrained, *pool.finetuned.values()):
        inner = source.inner if isinstance(source, DtypeView) else source
        if not isinstance(inner, SafetensorsReader):
            return None
        readers.append(inner)
    for key in stream.plan.merged:
        if pool.pretrained.dtype(key) != dtype:
            return None
        if any(r.stored_dtype(key) != dtype for r in readers):
            return None
    return readers


def whole_keys(stream: TaskVectorStream) -> list[tuple[str, int, int]]:
    """Every merged key of `stream` as one unit `(key, 0, numel)`, in key order."""
    return [(key, 0, stream.numel(key)) for key in stream.plan.merged]


def spans_of(units: Iterable[tuple[str, int, int]]) -> list[Span]:
    """The spans of `units` (`(key, first, stop)` entry ranges, in order): each unit cut
    into `SPAN_NUMEL` entries from its own start, the last one shorter; an empty unit gives one
    empty span (so that its key is still written)."""
    spans, span = [], SPAN_NUMEL
    for index, (key, first, stop) in enumerate(units):
        starts = range(first, stop, span) if stop > first else [first]
        spans.extend(
            Span(key, start, min(stop, start + span), index, start - first) for start in starts
        )
    return spans


class SpanBuffers:
    """One worker's reused buffers: the rows `read` fills (one per source, in the caller's
    order: the pretrained model first) and a work's own outputs (`get`)."""

    def __init__(self, sources: int, dtype: np.dtype, span: int) -> None:
        self.storage = huge_page_array((sources, span), dtype)  # reads land here
        self.scratch: dict[str, np.ndarray] = {}  # a work's own reused outputs

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A reused array `name` of at least `shape`'s entries, viewed as `shape`."""
        numel = int(np.prod(shape))
        held = self.scratch.get(name)
        if held is None or held.size < numel or held.dtype != dtype:
            held = self.scratch[name] = np.empty(max(numel, 1), dtype=dtype)
        return held[:numel].reshape(shape)

    def read(self, sources: list[SafetensorsReader], piece: Span) -> np.ndarray:
        """C-contiguous `[sources, width]` rows holding the span of every source, as stored
        (a short span packs its rows at the front: one array layout for the kernels)."""
        flat = self.storage.reshape(-1)[: len(sources) * piece.width]
        rows = flat.reshape(len(sources), piece.width)
        for source, row in zip(sources, rows, strict=True):
            source.read_stored(piece.key, row, piece.first)
        return rows


def run_spans(
    stream: TaskVectorStream,
    spans: list[Span],
    work: Callable[[Span, SpanBuffers], None],
    description: str,
    sources: int,
    dtype: np.dtype,
) -> None:
    """`work(span, buffers)` for every span on `stream.threads` worker threads, each with
    its own `SpanBuffers`, taking the next span in order as it is free; the first error stops
    the pass and is raised. (Threads of our own rather than an executor's futures: with a
    future per span and the waiting thread woken for each, the TinyLlama task-arithmetic
    merge's 4,200 spans took 2.96-3.26 user CPU s, without 2.45-2.62; docs/performance.md.)"""
    pieces = iter(spans)
    lock = threading.Lock()
    errors: list[BaseException] = []
    bar = stage(len(spans), description, enabled=stream.progress, unit="block")

    def run() -> None:
        try:
            buffers = SpanBuffers(sources, dtype, SPAN_NUMEL)
            while True:
                with lock:
                    piece = None if errors else next(pieces, None)
                if piece is None:
                    return
                work(piece, buffers)
                with lock:
                    bar.update()
        except BaseException as err:  # (a thread's own error would only reach its excepthook)
            with lock:
                errors.append(err)

    workers = [
        threading.Thread(target=run, name=f"mergebench-merge_{index}", daemon=True)
        for index in range(max(1, min(stream.threads, len(spans))))
    ]
    with bar:
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        except BaseException as err:  # (Ctrl-C in the join: the workers take no new span)
            with lock:
                errors.insert(0, err)
            for worker in workers:
                if worker.is_alive():
                    worker.join()
        if errors:
            raise errors[0]
