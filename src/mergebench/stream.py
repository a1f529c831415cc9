"""Tensor-by-tensor iteration over a pool: the one place that knows about keys, dtype and I/O.

Every data-free method is a per-tensor function of `(pretrained, task vectors [N, ...])`.
`TaskVectorStream` reads one key at a time from every checkpoint, checks it is finite, and
hands float32 tensors to the method. Methods that need a global statistic (TIES global
top-k, EMR's global rescaler) make several passes.

Why it is fast and lean:
- a background thread reads the next key (positional reads from the page cache, see
  `tensors.SafetensorsSource`) while the caller computes on the current one;
- the fine-tuned tensors are read straight into the rows of the `[N, *shape]` stack and
  turned into task vectors in place (`W_t - W_pre`), so each key costs one copy of the
  data, not three;
- with `reuse_buffers=True` the stack lives in two preallocated buffers that alternate
  (no allocation, no page faults per key); the caller must then be done with an item
  before asking for the next one (clone what you keep).
Peak memory is therefore the output plus about `2 * (N + 1)` copies of the largest tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mergebench.errors import MergeBenchError
from mergebench.pool import ModelPool
from mergebench.selection import KeyPlan, plan_keys

# A transform rewrites the task vectors of one key (DARE's drop-and-rescale). A factory makes
# a fresh one per pass so that random transforms replay identically in every pass.
TaskVectorTransform = Callable[[str, torch.Tensor], torch.Tensor]
TransformFactory = Callable[[], TaskVectorTransform]


@dataclass
class TensorItem:
    key: str
    pretrained: torch.Tensor  # float32
    task_vectors: torch.Tensor  # float32, [N, *shape]
    dtype: torch.dtype  # the pretrained storage dtype, for writing back
    _task_sum: torch.Tensor | None = field(default=None, repr=False)

    def task_sum(self) -> torch.Tensor:
        """`sum_t tau_t` over the task axis (computed once per item)."""
        if self._task_sum is None:
            self._task_sum = self.task_vectors.sum(dim=0)
        return self._task_sum


def load_float(source, key: str) -> torch.Tensor:
    tensor = source.get(key)
    if not torch.isfinite(tensor).all():
        raise MergeBenchError(f"{source.name}: tensor {key!r} has non-finite values (nan/inf)")
    return tensor.to(torch.float32)


@dataclass
class _Loaded:
    """The raw float32 tensors of one key, on the CPU (possibly in a reused buffer)."""

    key: str
    pretrained: torch.Tensor
    finetuned: torch.Tensor  # [N, *shape]


class _BufferSet:
    """Flat float32 storage for one key of the stream: pretrained + N fine-tuned rows."""

    def __init__(self, num_tasks: int, max_numel: int, pin: bool) -> None:
        self.pretrained = torch.empty(max_numel, pin_memory=pin)
        self.finetuned = torch.empty(num_tasks * max_numel, pin_memory=pin)

    def views(self, num_tasks: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        numel = math.prod(shape)
        # Views of the first entries keep the stack contiguous whatever the key's size.
        return (
            self.pretrained[:numel].view(shape),
            self.finetuned[: num_tasks * numel].view(num_tasks, *shape),
        )


class TaskVectorStream:
    """Passes over the merged keys of a pool, one tensor at a time."""

    def __init__(
        self,
        pool: ModelPool,
        plan: KeyPlan | None = None,
        transform_factory: TransformFactory | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        self.pool = pool
        self.plan = plan if plan is not None else plan_keys(pool)
        self.transform_factory = transform_factory
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergeBenchError(f"device: {device!r} requested but CUDA is not available")
        self.progress = progress

    @property
    def tasks(self) -> list[str]:
        return self.pool.tasks

    def numel(self, key: str) -> int:
        return self.pool.pretrained.numel(key)

    def passes(
        self, description: str = "merging", reuse_buffers: bool = False
    ) -> Iterator[TensorItem]:
        """One full pass; each call starts afresh (and replays random transforms).

        With `reuse_buffers`, an item's tensors are overwritten once the next item is asked
        for: use it for methods that reduce each item to new tensors before moving on.
        """
        transform = self.transform_factory() if self.transform_factory else None
        keys = self.plan.merged
        buffers = self._buffer_sets() if reuse_buffers and keys else None
        bar = tqdm(
            total=len(keys), desc=description, unit="tensor", leave=False,
            disable=not self.progress or None,
        )  # fmt: skip
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebench-read") as reader, bar:
            pending: Future[_Loaded] | None = None
            if keys:
                pending = reader.submit(self._load, keys[0], buffers[0] if buffers else None)
            for index in range(len(keys)):
                loaded = pending.result()
                # The previous item has been released (we are past its `yield`), so its
                # buffer set can take the key after this one while we compute on this one.
                if index + 1 < len(keys):
                    target = buffers[(index + 1) % 2] if buffers else None
                    pending = reader.submit(self._load, keys[index + 1], target)
                yield self._item(loaded, transform)
                bar.update()

    # -- internals ---------------------------------------------------------------------------
    def _buffer_sets(self) -> list[_BufferSet]:
        max_numel = max(self.numel(k) for k in self.plan.merged)
        pin = self.device.type == "cuda"
        return [_BufferSet(len(self.tasks), max_numel, pin) for _ in range(2)]

    def _load(self, key: str, buffers: _BufferSet | None) -> _Loaded:
        """Read one key of every checkpoint as float32 (runs in the reader thread)."""
        shape = self.pool.pretrained.shape(key)
        n = len(self.tasks)
        if buffers is None:
            pin = self.device.type == "cuda"
            pre = torch.empty(shape, pin_memory=pin)
            finetuned = torch.empty((n, *shape), pin_memory=pin)
        else:
            pre, finetuned = buffers.views(n, shape)
        self.pool.pretrained.read_into(key, pre)
        for row, source in zip(finetuned, self.pool.finetuned.values(), strict=True):
            source.read_into(key, row)
        return _Loaded(key, pre, finetuned)

    def _item(self, loaded: _Loaded, transform: TaskVectorTransform | None) -> TensorItem:
        key = loaded.key
        pre, taus = loaded.pretrained, loaded.finetuned
        if self.device.type != "cpu":
            pre, taus = pre.to(self.device), taus.to(self.device)
        taus.sub_(pre)  # W_t - W_pre, in place: the fine-tuned rows become task vectors
        # Any nan/inf in W_pre or a W_t makes the task sum non-finite: one cheap check.
        task_sum = taus.sum(dim=0)
        if not bool(torch.isfinite(task_sum).all()):
            raise self._non_finite(key)
        item = TensorItem(key, pre, taus, self.pool.pretrained.dtype(key), task_sum)
        if transform is not None:
            item = TensorItem(key, pre, transform(key, taus), item.dtype)
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
