"""DARE: drop each task-vector entry with probability p, rescale the kept ones by 1/(1-p),
then hand the task vectors to a data-free base method.

Randomness (method version 2): a counter-based generator, numpy's Philox-4x64, keyed by
(seed, task index, key name). Entry `i` of a key (row-major order) gets the 32-bit word `i`
of that generator's output stream from counter 0, so any block of any key is drawn on its
own, on any worker thread, in any order: a run is reproducible bit for bit whatever the
thread count, the row blocks and the machine, and replays exactly in every pass a base
method makes (e.g. TIES' global top-k). Version 1 (a torch generator per task consumed key
by key, hence one key at a time) is gone.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mergebench.engine import kernels
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TaskVectorTransform, numpy_kernels
from mergebench.methods.base import DEFAULT_CONTEXT, Method, RunContext, TaskVectorMethod
from mergebench.methods.options import flag, fraction, method_name, option, params_mapping
from mergebench.methods.registry import build_method, method_label
from mergebench.results import SingleModelResult
from mergebench.util.errors import MergeBenchError

# Version of DARE's draws recorded with each result (`Method.version`): 2 = Philox, per key.
DRAWS_VERSION = 2
# Entries drawn and applied at a time: the words and the mask stay in the cache.
_CHUNK = 1 << 16
# Philox-4x64 gives 4 uint64 words, i.e. 8 entries' 32-bit words, per counter value.
_ENTRIES_PER_COUNTER = 8


def philox_key(seed: int, task_index: int, key: str) -> np.ndarray:
    """The 128-bit Philox key of one (seed, task, key): numpy's SeedSequence hash of
    `[|seed|, seed < 0, task index, blake2b-128 of the key name as an integer]`."""
    name = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest(), "little")
    entropy = [abs(seed), int(seed < 0), task_index, name]
    return np.random.SeedSequence(entropy).generate_state(2, np.uint64)


def draw_words(key: np.ndarray, start: int, count: int) -> np.ndarray:
    """The uint32 words of entries `start .. start + count` of a key: word `i` is the low
    (even `i`) or high (odd `i`) half of uint64 output `i // 2` of `Philox(key)` from counter
    0 (each counter value gives 4 uint64 outputs), whatever `start` is."""
    first = start // _ENTRIES_PER_COUNTER
    skip = start - first * _ENTRIES_PER_COUNTER
    counters = -(-(skip + count) // _ENTRIES_PER_COUNTER)
    raw = np.random.Philox(key=key, counter=first).random_raw(counters * 4)
    # Little-endian uint64 -> two uint32, low half first, on any machine.
    return raw.astype("<u8", copy=False).view("<u4")[skip : skip + count]


def keep_threshold(p: float) -> int:
    """Keep an entry when its word `x >= ceil(p * 2^32)`: `u >= p` for `u = x / 2^32`
    (exact: `p * 2^32` is exact in float64)."""
    return math.ceil(p * 2.0**32)


def drop_and_rescale(
    task_vector: torch.Tensor, p: float, rescale: bool, key: np.ndarray, start: int = 0
) -> torch.Tensor:
    """Drop entries of one task's tensor in place (entry `i` of it is entry `start + i` of
    its key, row-major), dividing the kept ones by `1 - p` if `rescale`; returns it.

    On the CPU the draws, the drop and the division are one compiled pass
    (`kernels.philox_drop_and_rescale`: numpy's Philox rounds in the kernel); elsewhere (GPU)
    `draw_words` per chunk and torch ops, with the same result."""
    flat = task_vector.view(-1)
    threshold = keep_threshold(p)
    # torch divides float32 by the scalar rounded to float32
    keep = np.float32(1.0 - p)
    if numpy_kernels(flat):  # the words drawn in the kernel, as `draw_words` gives them
        kernels.philox_drop_and_rescale(
            flat.numpy(), key[0], key[1], start, np.int64(threshold), rescale, keep
        )
        return task_vector
    for offset in range(0, flat.numel(), _CHUNK):
        part = flat[offset : offset + _CHUNK]
        words = draw_words(key, start + offset, part.numel())
        if threshold > np.iinfo(np.uint32).max:
            kept = np.zeros(words.shape, dtype=bool)
        else:
            kept = words >= threshold  # P(keep) = 1 - p
        part.mul_(torch.from_numpy(kept).to(part.device))
        if rescale:
            part.div_(1.0 - p)
    return task_vector


class Dropper:
    """DARE's transform of one key's (or row block's) task-vector stack, in place. Its draws
    depend only on (seed, task, key, entry), so the stream may run it on any thread, in any
    order, on row blocks (`order_free`)."""

    order_free = True

    def __init__(self, num_tasks: int, p: float, rescale: bool, seed: int) -> None:
        self.num_tasks, self.p, self.rescale, self.seed = num_tasks, p, rescale, seed

    def __call__(
        self, key: str, task_vectors: torch.Tensor, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        start = 0
        if rows is not None and task_vectors.dim() > 1:
            start = rows[0] * math.prod(task_vectors.shape[2:])
        for index, tau in enumerate(task_vectors):
            drop_and_rescale(tau, self.p, self.rescale, philox_key(self.seed, index, key), start)
        return task_vectors

    def philox_keys(self, key: str) -> np.ndarray:
        """uint64 `[N, 2]`: every task's Philox key for `key` (a span kernel's draws)."""
        return np.stack([philox_key(self.seed, index, key) for index in range(self.num_tasks)])

    def threshold(self) -> int:
        return keep_threshold(self.p)

    def keep(self) -> np.float32:
        return np.float32(1.0 - self.p)  # torch divides float32 by the scalar as float32


def make_dropper(num_tasks: int, p: float, rescale: bool, seed: int) -> TaskVectorTransform:
    return Dropper(num_tasks, p, rescale, seed)


def any_integer(method: str, option: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MergeBenchError(f"{method}.{option}: {value!r} is not an integer")
    return value


class Dare(Method):
    name = "dare"
    version = DRAWS_VERSION

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
