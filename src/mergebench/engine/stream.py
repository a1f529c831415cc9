"""Tensor-by-tensor iteration over a pool: the one place that knows about keys, dtype and I/O.

Every data-free method is a per-tensor function of `(pretrained, task vectors [N, ...])`.
`TaskVectorStream` reads one key at a time from every checkpoint, checks it is finite, and
hands float32 tensors to the method. Methods that need a global statistic (TIES global
top-k, EMR's global rescaler) make several passes.

Two ways to walk the keys:
- `map(fn)`: the fast path for methods that reduce each key to new tensors. A reader
  thread reads upcoming keys (positional reads from the page cache, see
  `tensors.SafetensorsReader`) into a few reused buffers while `threads` workers run `fn`
  on earlier keys; results come back in key order. Torch's own intra-op threads are set to
  1 meanwhile: whole keys in parallel use the cores without OpenMP's per-op barriers, which
  cost a lot on a small, busy machine (measured: docs/performance.md).
- `passes()`: a plain iterator (used by methods that keep the items), with a one-key
  prefetch.
Either way the fine-tuned tensors are read straight into the rows of the `[N, *shape]`
stack and become task vectors in place (`W_t - W_pre`): one copy of the data per key.
Peak memory is the output plus about `(threads + 1) * (N + 1)` copies of the largest
tensor, whatever the model size. Methods whose arithmetic goes entry by entry ask for
`map(..., row_blocks=True)`: a key above `ROW_BLOCK_NUMEL` entries (an LLM's embedding,
output and MLP matrices) then comes as blocks of whole rows (`TensorItem.rows`), so the
largest tensor no longer sets the peak. A method's passes share `map`'s buffer sets, so only
the first pass faults their pages in (huge pages on request cost more system time than they
saved here: the kernel compacts memory to find them).
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from mergebench.engine.keyplan import KeyPlan, plan_keys
from mergebench.engine.pool import ModelPool
from mergebench.util.errors import MergeBenchError
from mergebench.util.progress import stage

# A transform rewrites the task vectors of one key, or of the rows `rows` of it (DARE's
# drop-and-rescale): `transform(key, task_vectors, rows)`. A factory makes a fresh one per
# pass so that random transforms replay identically in every pass. A transform whose result
# depends only on its arguments says so with a true `order_free` attribute: it then runs on
# the workers in any order and may get row blocks; any other is applied key by key in order.
TaskVectorTransform = Callable[[str, torch.Tensor, "tuple[int, int] | None"], torch.Tensor]
TransformFactory = Callable[[], TaskVectorTransform]
R = TypeVar("R")


@dataclass
class TensorItem:
    key: str
    pretrained: torch.Tensor  # float32
    task_vectors: torch.Tensor  # float32, [N, *shape]
    dtype: torch.dtype  # the pretrained storage dtype, for writing back
    _task_sum: torch.Tensor | None = field(default=None, repr=False)
    # The rows `start:stop` of the key this item holds (a row block), or None: all of it.
    rows: tuple[int, int] | None = None

    def task_sum(self) -> torch.Tensor:
        """`sum_t tau_t` over the task axis, in task order (computed once per item)."""
        if self._task_sum is None:
            self._task_sum = sum_tasks(self.task_vectors)
        return self._task_sum


def sum_tasks(task_vectors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`sum_t x_t` over the first axis, added in task order: `((x_0 + x_1) + x_2) + ...`.

    torch's `sum(dim=0)` picks its addition order from the shape, so one key could round
    differently from the same numbers inside a bigger tensor. A fixed order makes a streamed
    merge bit-identical to an in-memory one that adds task vectors one after the other (as
    the reference code does). numpy's reduction over the first axis of a C-contiguous array
    adds whole rows in order, vectorized along the row.
    """
    if out is None:
        out = torch.empty(
            task_vectors.shape[1:], dtype=task_vectors.dtype, device=task_vectors.device
        )
    if task_vectors.device.type == "cpu" and task_vectors.is_contiguous() and out.is_contiguous():
        rows = task_vectors.reshape(task_vectors.shape[0], -1).numpy()
        np.add.reduce(rows, axis=0, out=out.reshape(-1).numpy())
        return out
    out.copy_(task_vectors[0])
    for row in task_vectors[1:]:
        out.add_(row)
    return out


class Scratch:
    """Named work buffers reused from key to key (grown to the largest key): no allocation,
    hence no page faults, per tensor. A buffer is overwritten by the next `get` of its name."""

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < numel or flat.dtype != dtype or flat.device != device:
            flat = torch.empty(numel, dtype=dtype, device=device)
            self._flat[name] = flat
        return flat[:numel].view(shape)


_thread_scratch = threading.local()


def thread_scratch() -> Scratch:
    """One `Scratch` per worker thread (workers run keys in parallel)."""
    if not hasattr(_thread_scratch, "value"):
        _thread_scratch.value = Scratch()
    return _thread_scratch.value


# Entries per block when subtracting and summing on the CPU: `[N, block]` stays in the cache.
_BLOCK = 1 << 15


def _task_vectors_and_sum(
    finetuned: torch.Tensor, pretrained: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    """`finetuned -= pretrained` (row by row) and return `sum_tasks(finetuned)`.

    On the CPU both run block by block, so each block is summed while still in the cache:
    one trip through memory instead of two.
    """
    if finetuned.device.type != "cpu" or not finetuned.is_contiguous():
        finetuned.sub_(pretrained)
        return sum_tasks(finetuned, out=out)
    if out is None:
        out = torch.empty(finetuned.shape[1:], dtype=finetuned.dtype)
    rows = finetuned.reshape(finetuned.shape[0], -1).numpy()
    pre = pretrained.reshape(-1).numpy()
    total = out.reshape(-1).numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results: checked next
        for start in range(0, rows.shape[1], _BLOCK):
            block = rows[:, start : start + _BLOCK]
            np.subtract(block, pre[start : start + _BLOCK], out=block)
            np.add.reduce(block, axis=0, out=total[start : start + _BLOCK])
    return out


@dataclass
class _Loaded:
    """The raw float32 tensors of one key, on the CPU (possibly in a reused buffer)."""

    key: str
    pretrained: torch.Tensor
    finetuned: torch.Tensor  # [N, *shape]
    task_sum: torch.Tensor | None = None  # a reused buffer for the task sum, if any
    rows: tuple[int, int] | None = None  # see TensorItem.rows


@dataclass(frozen=True)
class _Unit:
    """What one step of a pass reads: a whole key, or a block of its rows."""

    key: str
    rows: tuple[int, int] | None = None


# Keys of up to this many entries are read into reused buffers; a bigger one (an LLM's
# embedding or output matrix: 394M entries in Llama-3-3B) gets buffers of its own, freed
# with the key. Reused buffer sets sized for such keys would reserve (threads + 1) * (N + 1)
# float32 copies of them, and keep resident the pages of every set a big key passed through
# (an untied embedding and LM head go through two sets) for the rest of the merge.
REUSE_MAX_NUMEL = 1 << 25
# Entry-by-entry methods (`map(..., row_blocks=True)`) get keys above this many entries as
# blocks of rows of at most this many (or `REUSE_MAX_NUMEL`, if smaller). Small blocks keep
# every buffer of a pass small: the reused sets (threads + 1) * (N + 1) * 16 MiB, and the
# temporaries a method allocates per block stay below glibc's mmap threshold (32 MiB), so
# the allocator reuses them instead of mapping, faulting in and zeroing fresh pages for every
# key (measured: docs/performance.md, "Where the system time went").
ROW_BLOCK_NUMEL = 1 << 22


def row_blocks_of(shape: tuple[int, ...], limit: int) -> list[tuple[int, int]] | None:
    """Row ranges `(start, stop)` cutting a tensor of `shape` above `limit` entries into blocks
    of at most `limit` entries (whole rows, a multiple of 8 entries each but the last, so
    each block's masks bit-pack on their own); None when the tensor stays whole."""
    numel = math.prod(shape)
    if numel <= limit or len(shape) < 2 or shape[0] < 2:
        return None
    row = numel // shape[0]
    per = min(shape[0], limit // row)
    per -= next((d for d in range(per) if (per - d) * row % 8 == 0), per)
    if per < 1 or per >= shape[0]:
        return None  # rows too long to cut (or an odd length): the whole key, as before
    return [(start, min(shape[0], start + per)) for start in range(0, shape[0], per)]


def _block_limit(small_blocks: bool) -> int:
    """Entries per row block of `map(..., row_blocks=True, small_blocks=...)`."""
    return min(REUSE_MAX_NUMEL, ROW_BLOCK_NUMEL) if small_blocks else REUSE_MAX_NUMEL


def _ordered(transform: TaskVectorTransform | None) -> bool:
    """Whether `transform` must run key by key in order (it then sees whole keys)."""
    return transform is not None and not getattr(transform, "order_free", False)


class _BufferSet:
    """Flat float32 storage for one key of the stream: pretrained + N fine-tuned rows."""

    def __init__(self, num_tasks: int, max_numel: int, pin: bool) -> None:
        self.capacity = max_numel
        self.pretrained = torch.empty(max_numel, pin_memory=pin)
        self.finetuned = torch.empty(num_tasks * max_numel, pin_memory=pin)
        self.task_sum = torch.empty(max_numel)

    def views(self, num_tasks: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        numel = math.prod(shape)
        # Views of the first entries keep the stack contiguous whatever the key's size.
        return (
            self.pretrained[:numel].view(shape),
            self.finetuned[: num_tasks * numel].view(num_tasks, *shape),
        )

    def task_sum_view(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.task_sum[: math.prod(shape)].view(shape)


class TaskVectorStream:
    """Passes over the merged keys of a pool, one tensor at a time."""

    def __init__(
        self,
        pool: ModelPool,
        plan: KeyPlan | None = None,
        transform_factory: TransformFactory | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
        threads: int | None = None,
    ) -> None:
        self.pool = pool
        self.plan = plan if plan is not None else plan_keys(pool)
        self.transform_factory = transform_factory
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergeBenchError(f"device: {device!r} requested but CUDA is not available")
        self.progress = progress
        # Workers for `map`: one per core by default; a GPU runs one key at a time.
        if threads is None:
            threads = 1 if self.device.type != "cpu" else default_threads()
        if threads < 1:
            raise MergeBenchError(f"threads: {threads} must be at least 1")
        self.threads = threads
        self._spare: list[_BufferSet] = []  # `map`'s buffer sets, kept for its next pass

    @property
    def tasks(self) -> list[str]:
        return self.pool.tasks

    def numel(self, key: str) -> int:
        return self.pool.pretrained.numel(key)

    def map(
        self,
        fn: Callable[[TensorItem], R],
        description: str = "merging",
        row_blocks: bool = False,
        small_blocks: bool = True,
        keys: Collection[str] | None = None,
    ) -> Iterator[tuple[str, R]]:
        """Yield `(key, fn(item))` for every merged key, in key order.

        `fn` runs in worker threads on items whose tensors live in reused buffers: it must
        return new tensors (or numbers) and keep no reference to the item's tensors. An
        `order_free` transform (DARE) runs on the workers too; any other is applied in key
        order, so that draws from a shared generator would replay exactly.
        With `row_blocks`, a key above `ROW_BLOCK_NUMEL` entries comes as several items in
        row order, each with its `rows`, and yields once per block (not with a transform
        that is not `order_free`: it sees whole keys). `small_blocks=False` cuts only keys
        above `REUSE_MAX_NUMEL`, into blocks that size: for a method whose per-block float
        sums add up differently when the blocks move (EMR's rescalers). `keys` limits the
        pass to those merged keys (a counting pass over the big keys only, say; their blocks
        are the ones a full pass cuts, see `split_keys`).
        """
        transform = self.transform_factory() if self.transform_factory else None
        ordered = _ordered(transform)
        units = self._units(row_blocks and not ordered, small_blocks, keys)
        if not units:
            return
        workers = self.threads
        free: queue.Queue[_BufferSet] = queue.Queue()
        sets = self._take_spare(workers + 1, units)
        for buffers in sets:
            free.put(buffers)
        transformed = [threading.Event() for _ in units]
        stop = threading.Event()

        def load(index: int) -> tuple[_Loaded, _BufferSet]:
            while True:  # wait for a free buffer set, unless the pass is being torn down
                try:
                    buffers = free.get(timeout=0.05)
                    break
                except queue.Empty:
                    if stop.is_set():
                        raise _Cancelled from None
            try:
                return self._load(units[index], buffers), buffers
            except BaseException:
                free.put(buffers)
                raise

        def compute(index: int, loading: Future) -> R:
            buffers = None
            try:
                loaded, buffers = loading.result()
                item = self._item(loaded, None)
                if transform is not None:
                    if ordered and index > 0:
                        transformed[index - 1].wait()
                    item = TensorItem(
                        item.key, item.pretrained,
                        transform(item.key, item.task_vectors, item.rows), item.dtype,
                        rows=item.rows,
                    )  # fmt: skip
                    transformed[index].set()
                return fn(item)
            finally:
                transformed[index].set()
                if buffers is not None:
                    free.put(buffers)

        bar = self._bar(description, len(units))
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebench-read")
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergebench-merge")
        inflight: deque[Future[R]] = deque()
        submitted = 0

        def submit() -> None:
            nonlocal submitted
            loading = reader.submit(load, submitted)
            inflight.append(pool.submit(compute, submitted, loading))
            submitted += 1

        try:
            with single_threaded_ops(self.device.type == "cpu"), bar:
                while submitted < min(len(units), workers + 1):
                    submit()
                # While the reader reads the first keys; only for a method that imported the
                # kernels (numba is not imported for the others).
                kernels = sys.modules.get("mergebench.engine.kernels")
                if kernels is not None and self.device.type == "cpu":
                    kernels.warm_up()
                for unit in units:
                    result = inflight.popleft().result()
                    if submitted < len(units):
                        submit()
                    yield unit.key, result
                    bar.update()
        finally:
            stop.set()
            for future in inflight:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            reader.shutdown(wait=True, cancel_futures=True)
            self._spare = sets  # nothing uses them now: the next pass reads into them

    def passes(
        self, description: str = "merging", reuse_buffers: bool = False
    ) -> Iterator[TensorItem]:
        """One full pass; each call starts afresh (and replays random transforms).

        With `reuse_buffers`, an item's tensors are overwritten once the next item is asked
        for: use it for methods that reduce each item to new tensors before moving on.
        """
        transform = self.transform_factory() if self.transform_factory else None
        keys = self.plan.merged
        self._spare = []  # `map`'s sets, if any: freed before this pass takes its own
        buffers = self._buffer_sets() if reuse_buffers and keys else None
        bar = self._bar(description, len(keys))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebench-read") as reader, bar:
            pending: Future[_Loaded] | None = None
            if keys:
                first = buffers[0] if buffers else None
                pending = reader.submit(self._load, _Unit(keys[0]), first)
            for index in range(len(keys)):
                loaded = pending.result()
                # The previous item has been released (we are past its `yield`), so its
                # buffer set can take the key after this one while we compute on this one.
                if index + 1 < len(keys):
                    target = buffers[(index + 1) % 2] if buffers else None
                    pending = reader.submit(self._load, _Unit(keys[index + 1]), target)
                yield self._item(loaded, transform)
                bar.update()

    def split_keys(self, small_blocks: bool = True) -> dict[str, list[tuple[int, int]]]:
        """The keys `map(..., row_blocks=True, small_blocks=...)` cuts into row blocks, with
        their row ranges in order (none when the transform needs whole keys): a method that
        ranks a whole key can count over exactly those blocks first."""
        if self.transform_factory is not None and _ordered(self.transform_factory()):
            return {}
        limit = _block_limit(small_blocks)
        split = {}
        for key in self.plan.merged:
            blocks = row_blocks_of(self.pool.pretrained.shape(key), limit)
            if blocks is not None:
                split[key] = blocks
        return split

    # -- internals ---------------------------------------------------------------------------
    def _units(
        self, row_blocks: bool, small_blocks: bool, keys: Collection[str] | None
    ) -> list[_Unit]:
        limit = _block_limit(small_blocks)
        units: list[_Unit] = []
        for key in self.plan.merged:
            if keys is not None and key not in keys:
                continue
            blocks = row_blocks_of(self.pool.pretrained.shape(key), limit)
            if row_blocks and blocks is not None:
                units.extend(_Unit(key, rows) for rows in blocks)
            else:
                units.append(_Unit(key))
        return units

    def _unit_shape(self, unit: _Unit) -> tuple[int, ...]:
        shape = self.pool.pretrained.shape(unit.key)
        if unit.rows is None:
            return shape
        return (unit.rows[1] - unit.rows[0], *shape[1:])

    def _buffer_sets(self, count: int = 2, units: list[_Unit] | None = None) -> list[_BufferSet]:
        units = units if units is not None else [_Unit(k) for k in self.plan.merged]
        numels = [math.prod(self._unit_shape(u)) for u in units]
        max_numel = max((n for n in numels if n <= REUSE_MAX_NUMEL), default=0)
        pin = self.device.type == "cuda"
        return [_BufferSet(len(self.tasks), max_numel, pin) for _ in range(count)]

    def _take_spare(self, count: int, units: list[_Unit]) -> list[_BufferSet]:
        """The previous pass's buffer sets if they fit this one (a method's passes read the
        same keys: its pages are already mapped), else new ones."""
        spare, self._spare = self._spare, []
        numels = [math.prod(self._unit_shape(u)) for u in units]
        needed = max((n for n in numels if n <= REUSE_MAX_NUMEL), default=0)
        if len(spare) == count and all(b.capacity >= needed for b in spare):
            return spare
        return self._buffer_sets(count, units)

    def _bar(self, description: str, total: int) -> Any:
        return stage(total, description, enabled=self.progress, unit="tensor")

    def _load(self, unit: _Unit, buffers: _BufferSet | None) -> _Loaded:
        """Read one key (or a block of its rows) of every checkpoint as float32 (runs in the
        reader thread)."""
        key, shape = unit.key, self._unit_shape(unit)
        n = len(self.tasks)
        if buffers is not None and math.prod(shape) > buffers.capacity:
            buffers = None  # an outsized key: buffers of its own (see REUSE_MAX_NUMEL)
        if buffers is None:
            pin = self.device.type == "cuda"
            pre = torch.empty(shape, pin_memory=pin)
            finetuned = torch.empty((n, *shape), pin_memory=pin)
        else:
            pre, finetuned = buffers.views(n, shape)
        sources = (self.pool.pretrained, *self.pool.finetuned.values())
        for source, out in zip(sources, (pre, *finetuned), strict=True):
            if unit.rows is None:
                source.read_into(key, out)
            else:
                source.read_rows_into(key, out, unit.rows[0])
        on_cpu = self.device.type == "cpu"
        task_sum = buffers.task_sum_view(shape) if buffers is not None and on_cpu else None
        return _Loaded(key, pre, finetuned, task_sum, unit.rows)

    def _item(self, loaded: _Loaded, transform: TaskVectorTransform | None) -> TensorItem:
        key = loaded.key
        pre, taus = loaded.pretrained, loaded.finetuned
        if self.device.type != "cpu":
            pre, taus = pre.to(self.device), taus.to(self.device)
        # W_t - W_pre in place (the fine-tuned rows become task vectors), and their sum.
        task_sum = _task_vectors_and_sum(taus, pre, loaded.task_sum)
        # Any nan/inf in W_pre or a W_t makes the task sum, hence its total, non-finite: two
        # cheap reductions instead of an elementwise `isfinite` over every tensor.
        if not math.isfinite(float(task_sum.sum())) and not bool(torch.isfinite(task_sum).all()):
            raise self._non_finite(key)
        item = TensorItem(key, pre, taus, self.pool.pretrained.dtype(key), task_sum, loaded.rows)
        if transform is not None:
            item = TensorItem(
                key, pre, transform(key, taus, loaded.rows), item.dtype, rows=loaded.rows
            )
        return item

    def _non_finite(self, key: str) -> MergeBenchError:
        for source in (self.pool.pretrained, *self.pool.finetuned.values()):
            if not bool(torch.isfinite(source.get(key)).all()):
                return MergeBenchError(
                    f"{source.name}: tensor {key!r} has non-finite values (nan/inf)"
                )
        return MergeBenchError(
            f"key {key!r}: task vectors overflow float32 (|W_t - W_pre| too large to merge)"
        )


def numpy_kernels(tensor: torch.Tensor) -> bool:
    """Whether the CPU (numpy, block by block) kernels handle `tensor`: a CPU tensor, unless
    `$MERGEBENCH_TORCH_KERNELS=1` asks for the device-agnostic torch formulas (the GPU
    path), which lets the GPU arithmetic be checked on a machine without one."""
    return tensor.device.type == "cpu" and os.environ.get("MERGEBENCH_TORCH_KERNELS") != "1"


def default_threads() -> int:
    """Workers for `map`: `$MERGEBENCH_THREADS` if set, else torch's intra-op thread count
    (the number of physical cores unless configured otherwise)."""
    value = os.environ.get("MERGEBENCH_THREADS")
    if not value:
        return torch.get_num_threads()
    try:
        threads = int(value)
    except ValueError:
        raise MergeBenchError(f"MERGEBENCH_THREADS: {value!r} is not an integer") from None
    if threads < 1:
        raise MergeBenchError(f"MERGEBENCH_THREADS: {threads} must be at least 1")
    return threads


class _Cancelled(Exception):
    """A read abandoned because its pass was torn down (an error, or the caller stopped)."""


_ops_lock = threading.Lock()
_ops_users = 0
_ops_threads_before = 1


@contextmanager
def single_threaded_ops(enabled: bool = True) -> Iterator[None]:
    """Torch intra-op threads = 1 while our workers run whole keys in parallel; restored when
    the last concurrent user leaves (merges may run in several threads at once)."""
    global _ops_users, _ops_threads_before
    if not enabled:
        yield
        return
    with _ops_lock:
        if _ops_users == 0:
            _ops_threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _ops_users += 1
    try:
        yield
    finally:
        with _ops_lock:
            _ops_users -= 1
            if _ops_users == 0:
                torch.set_num_threads(_ops_threads_before)
