"""DELLA-Merging: MagPrune each task vector, elect, disjoint mean, scale (methods.md).

MagPrune, per task, per row (the tensor viewed as `(shape[0], -1)`; a 1-D tensor is one
row, a 0-D tensor a row of one entry) of `n` entries: rank `r_i` in `1..n` by |tau_i|
ascending (stable), keep probability
`q_i = (density - window/2) + window * (r_i - 1) / (n - 1)` (`density` when `n = 1`),
`m_i ~ Bernoulli(q_i)`, `tau'_i = m_i * tau_i / q_i` (`m_i * tau_i` without `rescale`).
`q` is computed in float64 and rounded to float32; `m_i = (u_i < q_i)` with `u` uniform
float32 draws (`torch.rand`, the key's flat order) from a CPU `torch.Generator` seeded by
`della_seed(seed, task index, key index)`, the key index being the key's position in the
key plan's merged list: every key has its own generator, so keys run in parallel and a
run is reproducible bit for bit. A row block of a key (the stream's, for big keys) goes on
with the generators where the key's block before it left them (`DrawCursors`; a block out
of order first draws and drops the draws of the entries before it), so it gets what the
whole key would. The ranking, pruning, election and mean run in a compiled kernel
(`engine.della_kernels`), bit for bit these formulas (tests/methods/test_della_kernel.py).

Elect: `gamma = +1 where sum_t tau'_t >= 0 else -1` (a zero sum is +); disjoint mean over
the tasks whose `tau'_t` is non-zero with sign `gamma` (0 where none);
`W = W_pre + scaling * delta`.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mergebench.engine.della_kernels import della_rows
from mergebench.engine.stream import TaskVectorStream, TensorItem, thread_scratch
from mergebench.methods.base import TaskVectorMethod
from mergebench.methods.options import flag, fraction, integer, number, option
from mergebench.util.errors import MergeBenchError


def della_seed(seed: int, task_index: int, key_index: int) -> int:
    """The generator seed of one (task, key): numpy's SeedSequence hash of the triple."""
    state = np.random.SeedSequence([seed, task_index, key_index]).generate_state(1, np.uint64)
    return int(state[0])


def keep_probabilities(task_vector: torch.Tensor, density: float, window: float) -> torch.Tensor:
    """float32 `q` (same shape as `task_vector`): rank-based keep probabilities per row."""
    rows = task_vector.reshape(task_vector.shape[0] if task_vector.dim() > 1 else 1, -1)
    n = rows.shape[1]
    if n <= 1:
        return torch.full(task_vector.shape, density, dtype=torch.float32, device=rows.device)
    order = torch.argsort(rows.abs(), dim=1, stable=True)  # ascending |tau|
    ranks = torch.empty_like(order)  # 0-based: r_i - 1
    ranks.scatter_(1, order, torch.arange(n, device=rows.device).expand(rows.shape))
    low = density - window / 2
    q = low + window * ranks.to(torch.float64) / (n - 1)
    return q.to(torch.float32).reshape(task_vector.shape)


@functools.lru_cache(maxsize=64)
def rank_probabilities(n: int, density: float, window: float) -> np.ndarray:
    """float32 `q` by 0-based rank for rows of `n` entries: `keep_probabilities` of a row
    whose ranks are `0..n-1` (the same torch arithmetic, so the same bits)."""
    row = torch.arange(1, n + 1, dtype=torch.float32) if n > 1 else torch.ones(1)
    q = keep_probabilities(row, density, window).numpy()
    q.setflags(write=False)  # shared between the workers
    return q


def skip_draws(generator: torch.Generator, count: int) -> torch.Generator:
    """`generator` after `count` float32 draws, made and dropped in blocks (`torch.rand`
    takes one draw per entry in flat order, however the draws are cut: the block tests)."""
    scratch = torch.empty(min(count, BLOCK_NUMEL))
    while count > 0:
        step = min(count, BLOCK_NUMEL)
        torch.rand(step, generator=generator, out=scratch[:step])
        count -= step
    return generator


# Entries per task drawn, pruned and elected at a time when `della_delta` draws itself: a
# large key costs one float32 copy (the result) beyond the stream's buffers. (A stream row
# block's draws are made whole, `[N, block]`, by `DrawCursors`: 4M entries per task.)
BLOCK_NUMEL = 1 << 20


def _rows_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """`(rows, entries per row)` of a non-empty key: 0-D and 1-D keys are one row."""
    num_rows = shape[0] if len(shape) >= 2 else 1
    return num_rows, math.prod(shape) // num_rows


def _chunk_numel(shape: tuple[int, ...]) -> int:
    """Entries per task that `della_delta` draws at a time for a non-empty key of `shape`
    (whole rows, `BLOCK_NUMEL` or one row)."""
    num_rows, n = _rows_of(shape)
    return min(num_rows, max(1, BLOCK_NUMEL // n)) * n


def della_delta(
    task_vectors: torch.Tensor,
    key_index: int,
    density: float,
    window: float,
    rescale: bool,
    scaling: float,
    seed: int,
    offset: int = 0,
    draws: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """`scaling * delta` of one key from its float32 task-vector stack `[N, *shape]`, in
    blocks of rows: ranks are per row, elect and mean per entry, and each task's generator
    is drawn block after block in the key's flat order, as one whole-key draw would be.
    `offset`: the stack holds the key's rows from flat entry `offset` on (a row block of
    the stream): each generator first skips the draws of the entries before it.
    `draws`: the stack's draws `[N, numel]`, already made (`DrawCursors`): no generator.
    `out`: a CPU float32 buffer of the key's shape for the result, else a new tensor; it
    may be `draws[0]` (the kernel writes a row of the result after reading its draws).
    `scratch`: a CPU float32 `[N, >= _chunk_numel(shape)]` buffer for the draws made here,
    else a new one."""
    num_tasks, shape = task_vectors.shape[0], tuple(task_vectors.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    if out.numel() == 0:
        return out.to(task_vectors.device)
    generators = []
    if draws is None:
        generators = [
            skip_draws(torch.Generator().manual_seed(della_seed(seed, t, key_index)), offset)
            for t in range(num_tasks)
        ]
    num_rows, n = _rows_of(shape)
    taus = task_vectors.to("cpu", torch.float32).contiguous().reshape(num_tasks, num_rows, n)
    taus_np = taus.numpy()
    bits = taus_np.view(np.uint32)
    qtab = rank_probabilities(n, density, window)
    per = num_rows if draws is not None else _chunk_numel(shape) // n
    if draws is None:
        draws = scratch if scratch is not None else torch.empty(num_tasks, per * n)
    rows_out = out.reshape(num_rows, n).numpy()
    for start in range(0, num_rows, per):
        stop = min(num_rows, start + per)
        count = (stop - start) * n
        for t, generator in enumerate(generators):
            torch.rand(count, generator=generator, out=draws[t, :count])
        block_draws = draws[:, :count].numpy().reshape(num_tasks, stop - start, n)
        della_rows(
            taus_np[:, start:stop],
            bits[:, start:stop],
            block_draws,
            qtab,
            rescale,
            np.float32(scaling),
            rows_out[start:stop],
        )
    return out.to(task_vectors.device)


def _work(numel: int) -> torch.Tensor:
    """This worker's reused float32 buffer of `numel` entries (`stream.thread_scratch`), for
    a key's draws and result: overwritten by its next key. Fresh 16-48 MiB tensors per row
    block cost page faults, and the heap kept 0.1-0.2 GiB above them on the TinyLlama pool
    (docs/performance.md, "DELLA at the read limit")."""
    return thread_scratch().get("della work", (numel,), torch.float32, torch.device("cpu"))


class DrawCursors:
    """Each split key's generators where its last drawn row block left them, so the next
    block goes on from there instead of drawing and dropping every entry before it.

    A block takes the generators left at its offset (waiting while the block before it is
    drawing: that never waits on anything), draws its own entries, and leaves them at its
    end. A block with no generators waiting for it (the first, or blocks out of order) gets
    fresh ones skipped to its offset: the same draws, only slower.
    """

    def __init__(self, seed: int, num_tasks: int) -> None:
        self._seed, self._num_tasks = seed, num_tasks
        self._changed = threading.Condition()
        # (key index, flat offset) -> the generators there, or None while a block draws them.
        self._at: dict[tuple[int, int], list[torch.Generator] | None] = {}
        # Blocks that have begun: generators left at one of these offsets would wait forever.
        self._started: set[tuple[int, int]] = set()

    def draws(
        self, key_index: int, offset: int, count: int, numel: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[N, count]` float32: every task's draws of the key's entries `offset..+count`,
        into `out` if given (a worker's reused buffer), else a new tensor."""
        start, end = (key_index, offset), (key_index, offset + count)
        with self._changed:
            while start in self._at and self._at[start] is None:
                self._changed.wait()
            generators = self._at.pop(start, None)
            self._started.add(start)
            self._at[end] = None
        try:
            if generators is None:
                generators = [
                    skip_draws(torch.Generator().manual_seed(seed), offset)
                    for seed in (
                        della_seed(self._seed, t, key_index) for t in range(self._num_tasks)
                    )
                ]
            draws = torch.empty(self._num_tasks, count) if out is None else out
            for row, generator in zip(draws, generators, strict=True):
                torch.rand(count, generator=generator, out=row)
        except BaseException:
            generators = None
            raise
        finally:
            with self._changed:
                if generators is None or offset + count >= numel or end in self._started:
                    del self._at[end]  # no block goes on from here (or a draw failed)
                else:
                    self._at[end] = generators
                self._changed.notify_all()
        return draws


def window_fits(where: str, given: Any, window: float, earlier: Mapping[str, Any]) -> None:
    """`window >= 0`, and `density ± window/2` inside (0, 1]."""
    if not window >= 0:
        raise MergeBenchError(f"{where}: {given!r} must be a number >= 0")
    density = earlier["density"]
    low, high = density - window / 2, density + window / 2
    if not (low > 0 and high <= 1):
        raise MergeBenchError(
            f"{where}: density ± window/2 = [{low:g}, {high:g}] must lie inside (0, 1]"
        )


class Della(TaskVectorMethod):
    name = "della"
    post_scaling = "scaling"

    density: float = option(fraction)
    window: float = option(number, also=window_fits)
    scaling: float = option(number)
    rescale: bool = option(flag)
    seed: int = option(integer, minimum=0)

    def setup(self) -> None:
        self._key_index: dict[str, int] = {}
        self._numels: dict[str, int] = {}
        self._cursors = DrawCursors(self.seed, 0)

    def prepare(self, stream: TaskVectorStream) -> None:
        # Read-only while the workers run: each key finds its own generator seed.
        self._key_index = {key: i for i, key in enumerate(stream.plan.merged)}
        self._numels = {key: stream.numel(key) for key in stream.plan.merged}
        self._cursors = DrawCursors(self.seed, len(stream.tasks))

    def splits_rows(self) -> bool:
        # Rows are first-axis rows, which the stream's row blocks keep whole; a block's draws
        # start where the key's flat order has them (`della_delta`'s `offset`).
        return True

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        # The draws and the result go into this worker's reused buffer (`_work`): the result
        # lives there until the worker's next item (the stream's driver adds it to the
        # pretrained tensor at once).
        taus = item.task_vectors
        num_tasks, shape = len(taus), tuple(taus.shape[1:])
        numel = math.prod(shape)
        if item.rows is None:  # drawn in chunks, the result after them
            chunk = _chunk_numel(shape) if numel else 0
            work = _work(num_tasks * chunk + numel)
            scratch = work[: num_tasks * chunk].view(num_tasks, chunk)
            out = work[num_tasks * chunk :].view(shape)
            return self._delta(item.key, taus, out=out, scratch=scratch)
        # A row block (the stream's small ones): its draws go on where the block before it
        # left each generator (`DrawCursors`), made before the kernel runs so that the next
        # block's worker waits for the draws only. The result takes task 0's draws' place.
        row = numel // (item.rows[1] - item.rows[0])
        draws = self._cursors.draws(
            self._key_index[item.key], item.rows[0] * row, numel, self._numels[item.key],
            out=_work(num_tasks * numel).view(num_tasks, numel),
        )  # fmt: skip
        return self._delta(item.key, taus, draws, out=draws[0].view(shape))

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return self._delta(key, task_vectors)

    def _delta(
        self,
        key: str,
        task_vectors: torch.Tensor,
        draws: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return della_delta(
            task_vectors,
            self._key_index[key],
            self.density,
            self.window,
            self.rescale,
            self.scaling,
            self.seed,
            draws=draws,
            out=out,
            scratch=scratch,
        )
