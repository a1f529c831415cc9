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
run is reproducible bit for bit. A row block of a key (the stream's, for big keys) first
draws and drops the draws of the entries before it, so it gets what the whole key would.

Elect: `gamma = +1 where sum_t tau'_t >= 0 else -1` (a zero sum is +); disjoint mean over
the tasks whose `tau'_t` is non-zero with sign `gamma` (0 where none);
`W = W_pre + scaling * delta`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mergebench.engine.stream import TaskVectorStream, TensorItem, sum_tasks
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


def magprune(
    task_vector: torch.Tensor,
    density: float,
    window: float,
    rescale: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """MagPrune one task's tensor with draws from `generator` (a CPU generator)."""
    if task_vector.numel() == 0:
        return task_vector.clone()
    q = keep_probabilities(task_vector, density, window)
    draws = torch.rand(task_vector.shape, generator=generator).to(task_vector.device)
    keep = draws < q
    kept = task_vector * keep
    return kept / q if rescale else kept


def elect_and_disjoint_mean(pruned: torch.Tensor) -> torch.Tensor:
    """`gamma = +1 where sum_t >= 0 else -1`; mean of the non-zero entries that agree."""
    total = sum_tasks(pruned)
    gamma = torch.where(total >= 0, 1.0, -1.0).to(pruned.dtype)
    agree = pruned * gamma > 0  # gamma is +-1: the product is exact, never underflows
    agreeing = sum_tasks(pruned * agree)
    count = agree.sum(dim=0)
    return torch.where(count > 0, agreeing / count.clamp(min=1), torch.zeros_like(agreeing))


def skip_draws(generator: torch.Generator, count: int) -> torch.Generator:
    """`generator` after `count` float32 draws, made and dropped in blocks (`torch.rand`
    takes one draw per entry in flat order, however the draws are cut: the block tests)."""
    scratch = torch.empty(min(count, BLOCK_NUMEL))
    while count > 0:
        step = min(count, BLOCK_NUMEL)
        torch.rand(step, generator=generator, out=scratch[:step])
        count -= step
    return generator


# Entries per task pruned and elected at a time: the ranks (int64), probabilities and draws
# are that block's size, so a large key costs one float32 copy (the result) beyond the
# stream's buffers instead of several of the whole stack.
BLOCK_NUMEL = 1 << 20


def della_delta(
    task_vectors: torch.Tensor,
    key_index: int,
    density: float,
    window: float,
    rescale: bool,
    scaling: float,
    seed: int,
    offset: int = 0,
) -> torch.Tensor:
    """`scaling * delta` of one key from its float32 task-vector stack `[N, *shape]`, in
    blocks of rows: ranks are per row, elect and mean per entry, and each task's generator
    is drawn block after block in the key's flat order, as one whole-key draw would be.
    `offset`: the stack holds the key's rows from flat entry `offset` on (a row block of
    the stream): each generator first skips the draws of the entries before it."""
    generators = [
        skip_draws(torch.Generator().manual_seed(della_seed(seed, t, key_index)), offset)
        for t in range(task_vectors.shape[0])
    ]
    shape = task_vectors.shape[1:]
    blocks: list[slice | None] = [None]  # None: the whole key (0-D and 1-D keys are one row)
    if len(shape) >= 2 and task_vectors.numel() > 0:
        per = max(1, BLOCK_NUMEL // math.prod(shape[1:]))
        blocks = [slice(start, start + per) for start in range(0, shape[0], per)]
    out = torch.empty(shape, dtype=task_vectors.dtype, device=task_vectors.device)
    for rows in blocks:
        pruned = torch.stack(
            [
                magprune(tau if rows is None else tau[rows], density, window, rescale, generator)
                for tau, generator in zip(task_vectors, generators, strict=True)
            ]
        )
        target = out if rows is None else out[rows]
        torch.mul(elect_and_disjoint_mean(pruned), scaling, out=target)
    return out


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

    def prepare(self, stream: TaskVectorStream) -> None:
        # Read-only while the workers run: each key finds its own generator seed.
        self._key_index = {key: i for i, key in enumerate(stream.plan.merged)}

    def splits_rows(self) -> bool:
        # Rows are first-axis rows, which the stream's row blocks keep whole; a block's draws
        # start where the key's flat order has them (`della_delta`'s `offset`).
        return True

    def small_row_blocks(self) -> bool:
        # A block skips the draws of every entry before it: 32M-entry blocks keep that to a
        # few blocks' worth per task on an 8B vocabulary instead of ~120 with 4M blocks.
        return False

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        offset = 0
        if item.rows is not None:
            offset = item.rows[0] * math.prod(item.task_vectors.shape[2:])
        return self._delta(item.key, item.task_vectors, offset)

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        return self._delta(key, task_vectors, 0)

    def _delta(self, key: str, task_vectors: torch.Tensor, offset: int) -> torch.Tensor:
        return della_delta(
            task_vectors,
            self._key_index[key],
            self.density,
            self.window,
            self.rescale,
            self.scaling,
            self.seed,
            offset,
        )
