"""Fast task switching: put a live model into the weights of one task of a merge result, in
place, without rebuilding the model or materializing a state dict.

For a task-conditioned result (EMR, "X w/ M&R") each merged tensor becomes
`W_pre + lam_t * M_t * tau_uni`, computed straight into the model's parameter with the same
float32 arithmetic as `TaskConditionedResult.state_dict(task)`, so the weights are
bit-identical to `model.load_state_dict(result.state_dict(task))`. For an in-memory result,
or any result on a GPU, the unified vector, the packed masks and (by default) the
pretrained tensors are kept on the model's device, so a switch moves no data over the bus;
a result loaded from files (`load_result`, `merge(..., output_dir=...)`) on the CPU is read
from its files at each switch instead, so the switcher adds no model-sized copies. For a single-model result only the task's own
tensors (its head) change between tasks.

    switcher = TaskSwitcher(result, model)
    for task in result.tasks:
        switcher.switch(task)   # model now holds task's weights
        evaluate(model, task)
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from mergebench.engine.bits import unpack_bits
from mergebench.engine.stream import default_threads, single_threaded_ops
from mergebench.results import MergeResult, SingleModelResult, TaskConditionedResult
from mergebench.results.shards import LazyTensors, shape_of
from mergebench.util.errors import MergeBenchError


class TaskSwitcher:
    """Switches `model` between the tasks of `result` in place."""

    def __init__(
        self,
        result: MergeResult,
        model: nn.Module,
        cache_pretrained: bool | None = None,
        aliases: Collection[str] = (),
    ) -> None:
        """`cache_pretrained`: keep the pretrained merged tensors on the model's device
        (default: yes, unless the result is read from files on the CPU). `aliases`: model
        names sharing their tensor with another (a tied output matrix), which the result
        need not carry."""
        if not isinstance(result, (TaskConditionedResult, SingleModelResult)):
            raise MergeBenchError(f"cannot switch tasks of a {type(result).__name__}")
        self.result = result
        self.model = model
        # Every name load_state_dict would fill, tied weights included.
        self._targets: dict[str, torch.Tensor] = model.state_dict(keep_vars=True)
        self._aliases = frozenset(aliases)
        self.task: str | None = None
        self._device = _device_of(model)
        if isinstance(result, TaskConditionedResult):
            # A result loaded from files stays there on the CPU: each switch reads its tensors
            # (from the page cache), so the switcher holds no model-sized copies. Elsewhere
            # the tensors are kept on the model's device, so a switch moves no data.
            from_files = isinstance(result.unified, LazyTensors) and self._device.type == "cpu"
            self._unified: Mapping[str, torch.Tensor] = (
                result.unified
                if from_files
                else {k: v.to(self._device, torch.float32) for k, v in result.unified.items()}
            )
            self._packed: Mapping[str, torch.Tensor] | None = (
                None
                if result.masks is None
                else result.masks
                if from_files
                else {k: v.to(self._device) for k, v in result.masks.items()}
            )
            if cache_pretrained is None:
                cache_pretrained = not from_files
            self._pretrained = (
                {k: self._pre(k) for k in result.unified} if cache_pretrained else None
            )
            largest = max((math.prod(shape_of(result.unified, k)) for k in result.unified),
                          default=0)  # fmt: skip
            self.threads = default_threads() if self._device.type == "cpu" else 1
            self._work = [
                torch.empty(largest, dtype=torch.float32, device=self._device)
                for _ in range(self.threads)
            ]

    def switch(self, task: str) -> nn.Module:
        """Load `task`'s weights into the model (in place) and return the model."""
        if task not in self.result.tasks:
            raise MergeBenchError(
                f"task {task!r} is not in this result (tasks: {self.result.tasks})"
            )
        self._check_keys(task)
        # Everything is written on every switch (the shared tensors cost little): whatever
        # else was loaded into the model in between, it ends up holding exactly `task`.
        with torch.no_grad():
            for key, value in self._static().items():
                self._assign(key, value)
            if isinstance(self.result, TaskConditionedResult):
                self._apply_all(task)
            for key, value in self.result.task_specific.get(task, {}).items():
                self._assign(key, value)
        self.task = task
        return self.model

    # -- internals ---------------------------------------------------------------------------
    def _apply_all(self, task: str) -> None:
        keys = list(self.result.unified)
        if self._device.type != "cpu" or self.threads == 1:
            for key in keys:
                self._apply_modulators(task, key, self._work[0])
            return
        # On the CPU, keys in parallel (numpy and torch release the GIL), one op thread each.
        with single_threaded_ops(), ThreadPoolExecutor(self.threads) as pool:
            chunks = [keys[i :: self.threads] for i in range(self.threads)]
            futures = [
                pool.submit(self._apply_keys, task, chunk, work)
                for chunk, work in zip(chunks, self._work, strict=True)
            ]
            for future in futures:
                future.result()

    def _apply_keys(self, task: str, keys: list[str], work: torch.Tensor) -> None:
        with torch.no_grad():
            for key in keys:
                self._apply_modulators(task, key, work)

    def _static(self) -> dict[str, torch.Tensor]:
        """Tensors that are the same for every task."""
        result = self.result
        if isinstance(result, SingleModelResult):
            return result.shared
        return {**result.pretrained_excluded, **result.copied}

    def _pre(self, key: str) -> torch.Tensor:
        return self.result.pretrained.get(key).to(self._device)

    def _apply_modulators(self, task: str, key: str, work: torch.Tensor) -> None:
        """`W = W_pre + lam_t * M_t * tau_uni`, as `TaskConditionedResult.state_dict` has it."""
        result = self.result
        unified = self._unified[key]
        delta = work[: unified.numel()].view(unified.shape)
        torch.mul(unified, result.rescalers[task], out=delta)  # float32 * float32(lam)
        if self._packed is not None:
            row = self._packed[key][result.tasks.index(task)]
            mask = unpack_bits(row, tuple(unified.shape))
            # x * 1 and x * 0 are exact either way; a uint8 view takes torch's fast path.
            delta.mul_(mask.view(torch.uint8) if mask.device.type == "cpu" else mask)
        pre = self._pretrained[key] if self._pretrained is not None else self._pre(key)
        target = self._targets[key]
        if pre.dtype == torch.float32 and target.dtype == torch.float32:
            torch.add(pre, delta, out=target.data)  # no temporary: straight into the weights
        else:
            target.data.copy_((pre.to(torch.float32) + delta).to(pre.dtype))

    def _assign(self, key: str, value: torch.Tensor) -> None:
        target = self._targets[key]
        if target.shape != value.shape:
            raise MergeBenchError(
                f"key {key!r}: the model has shape {list(target.shape)}, the result "
                f"{list(value.shape)} (a task head of another size needs its own model)"
            )
        target.data.copy_(value)

    def _check_keys(self, task: str) -> None:
        result = self.result
        expected = set(self._static())
        expected |= set(result.task_specific.get(task, {}))
        if isinstance(result, TaskConditionedResult):
            expected |= set(result.unified)
        missing = sorted(set(self._targets) - expected - self._aliases)
        unexpected = sorted(expected - set(self._targets))
        if missing or unexpected:
            what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
            raise MergeBenchError(
                f"task {task!r}: the result does not fit the model ({what}; "
                f"{len(missing)} missing, {len(unexpected)} unexpected keys)"
            )


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.state_dict().values():
        return tensor.device
    return torch.device("cpu")
