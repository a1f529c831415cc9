"""TIES-Merging: trim, elect sign, disjoint merge, then `W_pre + lam * tau_m` (methods.md).

Trim keeps, per task, the entries whose |value| is at least the `keep`-th largest, with
`keep = max(1, floor(k * n + 0.5))` over `n` entries: over all merged tensors of the task
together (`topk_scope=global`, exact even when streamed: two counting passes of a radix
select, see `mergebench.engine.topk`; from float32 files often one, `_sampled_thresholds`)
or per tensor (`tensor`: the same radix select over the
one key on the CPU, no sort and no temporaries; nothing to select when every entry is kept,
as in mergekit's `dare_ties`, whose TIES keeps all of DARE's survivors). Per tensor on the
CPU, the keys the stream cuts into row blocks get their thresholds from two counting passes
over those blocks before the merge pass (`split_key_thresholds`), which then takes them in
blocks: no whole `[N, *shape]` stack of an LLM's embedding (the GPU path sees whole keys).

Sums over tasks are added in task order (`sum_tasks`), so a streamed merge is bit-identical
to an in-memory one. On the CPU the per-key arithmetic is one compiled pass
(`_merge_blocks`, `mergebench.engine.kernels`); `trim` and `elect_and_disjoint_merge` are
the same arithmetic in torch (the GPU path, and what the tests hold the kernel to).
"""

from __future__ import annotations

import functools
import math
import threading

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
from mergebench.engine.stream import (
    TaskVectorStream,
    TensorItem,
    numpy_kernels,
    sum_tasks,
    thread_scratch,
)
from mergebench.engine.topk import (
    RadixSelect,
    bin_with_kth_largest,
    kth_largest_abs_in_tensor,
    kth_values,
    per_key_totals,
)
from mergebench.methods.base import TaskVectorMethod, sign
from mergebench.methods.options import choice, fraction, number, option
from mergebench.results import ArtifactTarget, SingleModelResult
from mergebench.results.shards import ShardedWriter

AGGREGATES = ("sum", "mean")
# Entries per block of the CPU kernel: the `[N, block]` rows it reads twice stay in L1/L2.
_BLOCK = 1024


def keep_count(k: float, n: int) -> int:
    return max(1, math.floor(k * n + 0.5))


def trim(task_vectors: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry whose |value| is below its task's threshold (ties at it are kept)."""
    shape = (-1,) + (1,) * (task_vectors.dim() - 1)
    keep = task_vectors.abs() >= thresholds.reshape(shape).to(task_vectors.device)
    return task_vectors * keep


def elect_and_disjoint_merge(trimmed: torch.Tensor, aggregate: str) -> torch.Tensor:
    """`gamma = sgn(sum_t trimmed_t)`; combine the non-zero entries that agree with gamma."""
    gamma = sign(sum_tasks(trimmed))
    agree = trimmed * gamma > 0
    total = sum_tasks(trimmed * agree)
    if aggregate == "sum":
        return total
    count = agree.sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def tensor_thresholds(task_vectors: torch.Tensor, k: float) -> torch.Tensor:
    """Per task, the `keep_count(k, numel)`-th largest |value| of its tensor (float32 `[N]`).

    When every entry is kept the threshold is 0: `|x| >= 0` keeps every finite entry exactly
    as `|x| >= min |x|` does (the stream refuses non-finite ones). On the CPU the k-th largest
    is the radix select's two compiled counting passes over the stack (the same value as
    `torch.topk`'s, without its sort, copies and int64 indices: tens of GiB of fresh pages
    over an LLM, measured in docs/performance.md)."""
    n, numel = task_vectors.shape[0], task_vectors[0].numel()
    keep = keep_count(k, numel)
    if keep >= numel:
        return torch.zeros(n, dtype=torch.float32)
    if numpy_kernels(task_vectors) and task_vectors.is_contiguous():
        select = RadixSelect([keep] * n)
        select.add_high(select.high_counts(task_vectors))
        select.add_low(select.low_counts(task_vectors))
        return select.values()
    return torch.stack([kth_largest_abs_in_tensor(tau, keep) for tau in task_vectors])


def _merge_blocks(
    task_vectors: torch.Tensor,
    thresholds: torch.Tensor,
    aggregate: str,
    scaling: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`scaling * elect_and_disjoint_merge(trim(taus, thresholds))`, bit for bit, on the CPU:
    one compiled pass over the task rows (`kernels.ties_merge`; releases the GIL, so keys
    run in parallel), into `out` (float32, the key's shape) if given."""
    n = task_vectors.shape[0]
    taus = np.ascontiguousarray(task_vectors.reshape(n, -1).numpy())
    limits = np.ascontiguousarray(thresholds.to(torch.float32).reshape(n).cpu().numpy())
    if out is None:
        out = torch.empty(task_vectors.shape[1:], dtype=torch.float32)
    # torch scales float32 by float32(scaling)
    kernels.ties_merge(
        taus, limits, aggregate == "mean", np.float32(scaling), _BLOCK, out.view(-1).numpy()
    )
    return out


def _count_pass(
    stream: TaskVectorStream, shape: tuple[int, int], description: str, tops: np.ndarray | None
) -> torch.Tensor:
    """One counting pass of the radix select on the CPU: the high-bits histogram per task
    (`tops` None) or the low-bits one within the bins `tops`, `shape` `[tasks, bins]`.

    Each worker thread counts into one histogram of its own, reused from key to key (no
    fresh 4 MiB of pages and no addition per key); the threads' histograms are added at the
    end (integer counts: the same totals in any order, as `RadixSelect.add_high` /
    `add_low` per key gave)."""
    mine, histograms, lock = threading.local(), [], threading.Lock()

    def count(item: TensorItem) -> None:
        counts = getattr(mine, "counts", None)
        if counts is None:
            counts = mine.counts = np.zeros(shape, dtype=np.int64)
            with lock:
                histograms.append(counts)
        taus = item.task_vectors
        bits = taus.contiguous().reshape(taus.shape[0], -1).numpy().view(np.uint32)
        if tops is None:
            kernels.high_counts(bits, counts)
        else:
            kernels.low_counts(bits, tops, counts)

    for _ in stream.map(count, description, True):
        pass
    total = np.zeros(shape, dtype=np.int64)
    for counts in histograms:
        total += counts
    return torch.from_numpy(total)


def _task_vector_span(
    stream: TaskVectorStream, sources: list[SafetensorsReader], piece: Span, buffers: SpanBuffers
) -> np.ndarray:
    """`[N + 1, width]`: the span's pretrained entries, then its task vectors (float32),
    checked finite as the stream checks them."""
    rows = buffers.read(sources, piece)
    sums = buffers.get("task sum", (piece.width,), np.float32)
    if piece.width and not kernels.subtract_and_check(rows[0], rows[1:], 0, piece.width, sums):
        raise stream._non_finite(piece.key)
    return rows


def _span_count_pass(
    sources: list[SafetensorsReader],
    stream: TaskVectorStream,
    shape: tuple[int, int],
    description: str,
    tops: np.ndarray | None,
) -> torch.Tensor:
    """`_count_pass` span by span from float32 files (`engine.spans`): the same counts."""
    units = whole_keys(stream)
    counts = _span_count_pass_over(stream, sources, spans_of(units), shape, description, tops)
    return torch.from_numpy(counts)


def _span_count_pass_over(
    stream: TaskVectorStream,
    sources: list[SafetensorsReader],
    spans: list[Span],
    shape: tuple[int, int],
    description: str,
    tops: np.ndarray | None = None,
) -> np.ndarray:
    """The high-bits (`tops` None) or low-bits counts of `spans`' task vectors, int64."""
    mine, histograms, lock = threading.local(), [], threading.Lock()

    def work(piece: Span, buffers: SpanBuffers) -> None:
        counts = getattr(mine, "counts", None)
        if counts is None:
            counts = mine.counts = np.zeros(shape, dtype=np.int64)
            with lock:
                histograms.append(counts)
        bits = _task_vector_span(stream, sources, piece, buffers)[1:].view(np.uint32)
        if tops is None:
            kernels.high_counts(bits, counts)
        else:
            kernels.low_counts(bits, tops, counts)

    run_spans(stream, spans, work, description, len(sources), np.dtype(np.float32))
    total = np.zeros(shape, dtype=np.int64)
    for counts in histograms:
        total += counts
    return total


# The sampled select of the span path: a sample of one span in `_SAMPLE_EVERY` estimates
# each task's k-th largest |tau| (its high-bits bin from the sample's histogram, the low bits
# by where the rank falls within that bin's count); one full pass then counts the entries of
# a window of values around each estimate one by one (`kernels.window_counts`, straight from
# the raw entries, 8 lanes at a time: few entries fall in a window) and those above it. If
# every task's k-th lies in its window, the thresholds are read off exactly after that one
# pass; else (a miss, or a sample too unsure) the radix select's two passes run as before.
# The window's half width is twice the largest distance of an estimate from one of the
# sample's `_GROUPS` interleaved quarters to the whole sample's (a quarter's error is about
# twice the whole's), at least `_MIN_HALF` values; past `_MAX_HALF` the sample is too
# unsure to guess from.
_SAMPLE_EVERY = 16
_GROUPS = 4
_MIN_HALF = 1 << 12
_MAX_HALF = 1 << 16


def _sampled_thresholds(
    stream: TaskVectorStream, sources: list[SafetensorsReader], select: RadixSelect,
    description: str,
) -> torch.Tensor | None:  # fmt: skip
    """The exact k-th largest |tau| per task (float32 `[tasks]`) from one full pass over a
    window of values a sample points to; None (and `select`'s pass-1 counts filled, pass 2
    still to run) when the sample says nothing, is too unsure, or a task's k-th fell outside
    its window."""
    units = whole_keys(stream)
    spans = spans_of(units)
    tasks, bins = select.rows, select.high.shape[1]
    sample = spans[::_SAMPLE_EVERY]
    total = sum(piece.width for piece in spans)
    parts = [sample[g::_GROUPS] for g in range(_GROUPS) if sample[g::_GROUPS]]
    part_counts = [
        _span_count_pass_over(stream, sources, part, (tasks, bins), f"{description}: sample")
        for part in parts
    ]
    sizes = [sum(piece.width for piece in part) for part in parts]
    sampled = sum(part_counts, np.zeros((tasks, bins), dtype=np.int64))

    def estimate(counts: np.ndarray, size: int, r: int) -> int:
        # the same rank in a sample of `size` entries, in proportion (at least 1)
        rank = max(1, min(size, round(select.k[r] * size / max(total, 1))))
        return _value_of_rank(counts, rank)

    estimates = np.zeros(tasks, dtype=np.int64)
    spread = 0
    for r in range(tasks if sum(sizes) else 0):  # an empty sample (empty keys) says nothing
        estimates[r] = estimate(sampled[r], sum(sizes), r)
        for counts, size in zip(part_counts, sizes, strict=True):
            if size:  # a quarter of empty keys says nothing
                spread = max(spread, abs(estimate(counts[r], size, r) - int(estimates[r])))

    def radix_pass_1() -> None:
        counts = _span_count_pass_over(stream, sources, spans, (tasks, bins), description)
        select.add_high(torch.from_numpy(counts))

    half = max(_MIN_HALF, 2 * spread)
    if not sum(sizes) or half > _MAX_HALF:
        radix_pass_1()
        return None
    lows = np.maximum(estimates - half, 0).astype(np.uint32)
    mine, found, lock = threading.local(), [], threading.Lock()

    def work(piece: Span, buffers: SpanBuffers) -> None:
        held = getattr(mine, "counts", None)
        if held is None:
            held = mine.counts = (np.zeros((tasks, 2 * half), dtype=np.int64),
                                  np.zeros(tasks, dtype=np.int64))  # fmt: skip
            with lock:
                found.append(held)
        rows = buffers.read(sources, piece)
        sums = buffers.get("task sum", (piece.width,), np.float32)
        if piece.width and not kernels.window_counts(rows, lows, held[0], held[1], sums):
            raise stream._non_finite(piece.key)

    run_spans(stream, spans, work, f"{description}: top-k", len(sources), np.dtype(np.float32))
    window = sum((counts for counts, _ in found), np.zeros((tasks, 2 * half), dtype=np.int64))
    above = sum((counts for _, counts in found), np.zeros(tasks, dtype=np.int64))
    values = []
    for r in range(tasks):
        # entries >= lows[r] + o, for each offset o of the window
        at_least = above[r] + np.cumsum(window[r][::-1])[::-1]
        if not above[r] < select.k[r] <= at_least[0]:  # a miss: the radix select's passes
            radix_pass_1()
            return None
        values.append(int(lows[r]) + int(np.nonzero(at_least >= select.k[r])[0].max()))
    return torch.tensor(values, dtype=torch.int32).view(torch.float32)


def _value_of_rank(counts: np.ndarray, rank: int) -> int:
    """An estimate of the bits of the `rank`-th largest |value| a high-bits histogram counts:
    its bin, and within the bin's 65,536 values as far down as the rank is within the bin's
    count (entries taken as spread evenly over the bin)."""
    top, higher = bin_with_kth_largest(torch.from_numpy(counts), rank)
    within = (rank - higher - 0.5) / int(counts[top])
    return (top << 16) + min(0xFFFF, max(0, int((1.0 - within) * 0x10000)))


class Ties(TaskVectorMethod):
    name = "ties"
    post_scaling = "scaling"

    k: float = option(fraction)
    scaling: float = option(number)
    aggregate: str = option(choice, allowed=AGGREGATES)
    topk_scope: str = option(choice, allowed=("global", "tensor"))

    def setup(self) -> None:
        self._thresholds: torch.Tensor | None = None
        self._split: dict[str, torch.Tensor] = {}

    def prepare(self, stream: TaskVectorStream) -> None:
        """Global scope: the exact per-task threshold over all merged tensors (two passes).
        Per tensor on the CPU (k < 1): the thresholds of the keys the stream cuts into row
        blocks, from two passes over those keys only, so that the merge pass takes them in
        blocks too."""
        self._split = {}
        if self.topk_scope != "global":
            if self.k < 1.0 and stream.device.type == "cpu" and numpy_kernels(_CPU):
                self._split = split_key_thresholds(stream, self.k, self.name)
            return
        n = sum(stream.numel(key) for key in stream.plan.merged)
        select = RadixSelect([keep_count(self.k, n)] * len(stream.tasks))
        if stream.device.type != "cpu":
            for _, counts in stream.map(lambda item: select.high_counts(item.task_vectors),
                                        f"{self.name}: top-k 1/2", True):  # fmt: skip
                select.add_high(counts)
            select.targets()  # computed once, before the workers read them
            for _, counts in stream.map(lambda item: select.low_counts(item.task_vectors),
                                        f"{self.name}: top-k 2/2", True):  # fmt: skip
                select.add_low(counts)
        else:
            shape = (select.rows, select.high.shape[1])
            # float32 files: span by span (`engine.spans`), pass 1 with a guessed pass 2
            # (often the only full pass); else the stream's keys
            sources = stored_sources(stream.pool, stream, torch.float32)
            if sources is None:
                select.add_high(_count_pass(stream, shape, f"{self.name}: top-k 1/2", None))
            else:
                thresholds = _sampled_thresholds(stream, sources, select, self.name)
                if thresholds is not None:
                    self._thresholds = thresholds
                    return
            count = functools.partial(_span_count_pass, sources) if sources else _count_pass
            tops = np.array([top for top, _ in select.targets()], dtype=np.int64)
            select.add_low(count(stream, shape, f"{self.name}: top-k 2/2", tops))
        self._thresholds = select.values()

    def _merge_into(
        self, target: ArtifactTarget, pool: ModelPool, stream: TaskVectorStream
    ) -> SingleModelResult:
        """With a global threshold and float32 files: span by span (`engine.spans`), the
        task vectors, TIES and the merged entries in the cache, byte for byte the stream's
        artifact; else the stream."""
        sources = stored_sources(pool, stream, torch.float32)
        if self.topk_scope != "global" or sources is None:
            return super()._merge_into(target, pool, stream)
        return self._write_artifact(
            target, pool, stream, lambda writer: self._write_spans(stream, sources, writer)
        )

    def _write_spans(
        self, stream: TaskVectorStream, sources: list[SafetensorsReader], writer: ShardedWriter
    ) -> None:
        assert self._thresholds is not None, "prepare() computes the global thresholds"
        limits = np.ascontiguousarray(self._thresholds.to(torch.float32).numpy())
        mean, scaling = self.aggregate == "mean", np.float32(self.scaling)

        def work(piece: Span, buffers: SpanBuffers) -> None:
            rows = _task_vector_span(stream, sources, piece, buffers)
            out = buffers.get("merged", (piece.width,), np.float32)
            if piece.width:
                kernels.ties_merge(rows[1:], limits, mean, scaling, _BLOCK, out)
                np.add(rows[0], out, out=out)  # W_pre + delta in float32, as torch.add
            writer.write_span(piece.key, torch.from_numpy(out), piece.first)

        units = whole_keys(stream)
        run_spans(stream, spans_of(units), work, self.name, len(sources), np.dtype(np.float32))

    def splits_rows(self) -> bool:
        # A global threshold is known before the merge pass; a per-tensor one needs the key,
        # unless it keeps every entry (k = 1, mergekit's dare_ties): 0 for any block of rows.
        # Or the thresholds of the big keys are counted in `prepare` (the CPU kernels).
        return self.topk_scope == "global" or self.k == 1.0 or bool(self._split)

    def thresholds_for(
        self, task_vectors: torch.Tensor, item: TensorItem | None = None
    ) -> torch.Tensor:
        """Per task, the threshold of the key (or of the key of `item`, a row block)."""
        if item is not None and item.rows is not None and item.key in self._split:
            return self._split[item.key]
        if self.topk_scope == "global":
            assert self._thresholds is not None, "prepare() computes the global thresholds"
            return self._thresholds
        return tensor_thresholds(task_vectors, self.k)

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        thresholds = self.thresholds_for(task_vectors)
        if numpy_kernels(task_vectors) and task_vectors.is_contiguous():
            return _merge_blocks(task_vectors, thresholds, self.aggregate, self.scaling)
        trimmed = trim(task_vectors, thresholds)
        return self.scaling * elect_and_disjoint_merge(trimmed, self.aggregate)

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        """In the stream, the CPU kernel writes into the worker's reused buffer (a fresh one
        per key above glibc's mmap threshold would fault in new pages every time); the driver
        adds it to the output before the worker takes its next item."""
        taus = item.task_vectors
        thresholds = self.thresholds_for(taus, item)  # a row block's: its key's
        if not (numpy_kernels(taus) and taus.is_contiguous()):
            return self.scaling * elect_and_disjoint_merge(trim(taus, thresholds), self.aggregate)
        out = thread_scratch().get("ties delta", taus.shape[1:], torch.float32, taus.device)
        return _merge_blocks(taus, thresholds, self.aggregate, self.scaling, out)


def split_key_thresholds(stream: TaskVectorStream, k: float, name: str) -> dict[str, torch.Tensor]:
    """`tensor_thresholds(taus, k)` of every key the stream cuts into row blocks, from the
    radix select's two counting passes over those keys' blocks only (the same histograms,
    added up per key: the same values; one key's histograms alive at a time)."""
    split = stream.split_keys()
    tasks = len(stream.tasks)
    keeps = {key: keep_count(k, stream.numel(key)) for key in split}
    thresholds = {key: torch.zeros(tasks) for key in split if keeps[key] >= stream.numel(key)}
    counted = {key for key in split if key not in thresholds}
    if not counted:
        return thresholds
    targets: dict[str, list[tuple[int, int]]] = {}
    shape = (tasks, 1 << 16)

    def bits(item: TensorItem) -> np.ndarray:
        taus = item.task_vectors.contiguous()
        return taus.reshape(tasks, -1).numpy().view(np.uint32)

    def high(item: TensorItem) -> np.ndarray:
        counts = np.zeros(shape, dtype=np.int64)
        kernels.high_counts(bits(item), counts)
        return counts

    for key, counts in per_key_totals(
        stream.map(high, f"{name}: top-k 1/2", row_blocks=True, keys=counted)
    ):
        select = RadixSelect([keeps[key]] * tasks)
        select.add_high(torch.from_numpy(counts))
        targets[key] = select.targets()
    tops = {key: np.array([top for top, _ in t], dtype=np.int64) for key, t in targets.items()}

    def low(item: TensorItem) -> np.ndarray:
        counts = np.zeros(shape, dtype=np.int64)
        kernels.low_counts(bits(item), tops[item.key], counts)
        return counts

    for key, counts in per_key_totals(
        stream.map(low, f"{name}: top-k 2/2", row_blocks=True, keys=counted)
    ):
        thresholds[key] = kth_values(torch.from_numpy(counts), targets[key], [keeps[key]] * tasks)
    return thresholds


# A CPU tensor, to ask `numpy_kernels` whether the CPU kernels run (the environment may say no).
_CPU = torch.empty(0)
