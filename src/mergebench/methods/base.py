"""Method base classes and the shared driver for single-model task-vector methods."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mergebench.engine.keyplan import KeyPlan, plan_keys
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TaskVectorStream, TensorItem, TransformFactory, thread_scratch
from mergebench.methods.options import Option
from mergebench.results import ArtifactTarget, MergeResult, SingleModelResult
from mergebench.results.shards import Entry, ShardedWriter
from mergebench.util.errors import MergeBenchError


@dataclass(frozen=True)
class RunContext:
    """How one merge runs, not what it computes (so never part of a method's options): the
    device, whether progress is shown, and the artifact a data-free method streams its
    outputs into as keys finish (None: in memory). Handed to `Method.merge` as one object;
    a method built on another hands it on."""

    device: str | torch.device = "cpu"
    progress: bool = True
    target: ArtifactTarget | None = None


DEFAULT_CONTEXT = RunContext()


class Method:
    """A merging method. `name` is its registry and config name (`conf/method/<name>.yaml`).

    Each option is declared once, as a class attribute `k: float = option(fraction)`
    (`methods/options.py`); the config file gives its default. Construction checks the
    options in declaration order, sets each checked value as an attribute, then calls
    `setup()` for state derived from them.
    """

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False
    task_conditioned: ClassVar[bool] = False
    options: ClassVar[dict[str, Option]] = {}  # the declared options, in declaration order
    # Bumped when the same options give different numbers (DARE's new draws); recorded in
    # each result's `extra["method_version"]`.
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = {key: value for key, value in vars(cls).items() if isinstance(value, Option)}
        cls.options = {**cls.options, **declared}

    def __init__(self, **given: Any) -> None:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise MergeBenchError(
                f"method {self.name}: unknown option {unknown[0]!r} "
                f"(options: {', '.join(sorted(self.options))})"
            )
        missing = [key for key in self.options if key not in given]
        if missing:
            raise MergeBenchError(f"method {self.name}: option {missing[0]!r} is not set")
        checked: dict[str, Any] = {}
        for key, declared in self.options.items():
            checked[key] = declared.checked(self.name, given[key], checked)
        # As configured (or as checked, where declared so): recorded with every result.
        self.params = {
            key: checked[key] if declared.record_checked else given[key]
            for key, declared in self.options.items()
        }
        for key, value in checked.items():
            setattr(self, key, value)
        self.setup()

    def setup(self) -> None:  # noqa: B027 - optional hook
        """State derived from the checked options (a base method built, a pattern compiled)."""

    def merge(self, pool: ModelPool, context: RunContext = DEFAULT_CONTEXT) -> MergeResult:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **self.params}

    # Options that `label` already spells out (EMR's ablation flags, a base method's name):
    # a run's full label lists every other option that differs from its default.
    label_options: ClassVar[tuple[str, ...]] = ()
    # The option that only multiplies the merged task vector (`W_pre + s * delta`), if any:
    # the selection protocol merges once at 1 and rescales for the other values.
    post_scaling: ClassVar[str | None] = None

    @classmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        """The leaderboard row name of this method with `params` (defaults included): the
        method names its own variants, so nothing downstream parses or guesses labels."""
        return cls.name

    @classmethod
    def base_label(cls, params: Mapping[str, Any]) -> str | None:
        """The label of the method this one is built on top of ("X" of "X w/ M&R"), so that
        reports can pair them without parsing labels; None for a standalone method."""
        return None


class TaskVectorMethod(Method):
    """A data-free method giving one model: `W = W_pre + merge_task_vectors(tau)` per tensor.

    Subclasses implement `merge_task_vectors(taus)` on a float32 stack `[N, *shape]`; methods
    that need a statistic over the whole model first get `prepare(stream)`.
    """

    def prepare(self, stream: TaskVectorStream) -> None:  # noqa: B027 - optional hook
        """Optional first pass(es) over the stream (e.g. TIES global thresholds)."""

    def merge_task_vectors(self, key: str, task_vectors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merge_item(self, item: TensorItem) -> torch.Tensor:
        """The merged task vector of one streamed key; override to reuse the item's
        precomputed task sum (Task Arithmetic, weight averaging)."""
        return self.merge_task_vectors(item.key, item.task_vectors)

    def splits_rows(self) -> bool:
        """Whether `merge_task_vectors` goes entry by entry (no statistic over the whole
        tensor), so that a big key may come as blocks of rows (`TaskVectorStream.map`)."""
        return False

    def small_row_blocks(self) -> bool:
        """Whether split keys come in the stream's small blocks (`ROW_BLOCK_NUMEL`) rather
        than its large ones: small keeps buffers and temporaries reused; a method whose
        per-block cost grows with the block's offset (DELLA skips earlier draws) says no."""
        return True

    def _map_keys(self, stream: TaskVectorStream, fn: Callable[[TensorItem], None]) -> None:
        """Run `fn` on every key (or row block, as this method allows) on the workers."""
        for _ in stream.map(
            fn, self.name, row_blocks=self.splits_rows(), small_blocks=self.small_row_blocks()
        ):
            pass

    def accept_pool(self, pool: ModelPool) -> None:
        """Before any key is read: refuse a pool this method cannot merge (a number of
        tasks, say), or take what it needs from the task list (SLERP's endpoints)."""

    def merge(
        self,
        pool: ModelPool,
        context: RunContext = DEFAULT_CONTEXT,
        transform_factory: TransformFactory | None = None,
        plan: KeyPlan | None = None,
    ) -> SingleModelResult:
        self.accept_pool(pool)
        stream = TaskVectorStream(
            pool,
            plan or plan_keys(pool),
            transform_factory,
            device=context.device,
            progress=context.progress,
        )
        self.prepare(stream)

        if context.target is not None:
            return self._merge_into(context.target, pool, stream)

        # Outputs allocated up front, before any worker runs: the per-key temporaries of the
        # workers then never sit between kept outputs on the heap (less RSS, measured).
        pre = pool.pretrained
        outputs = {k: torch.empty(pre.shape(k), dtype=pre.dtype(k)) for k in stream.plan.merged}

        def merge_item(item: TensorItem) -> None:  # overwrites the item's pretrained buffer
            delta = self.merge_item(item)
            out = outputs[item.key]
            if item.rows is not None:
                out = out[item.rows[0] : item.rows[1]]
            add_to_pretrained(item.pretrained, delta, out)

        # Keys run in parallel worker threads: `merge_task_vectors` must not keep state.
        self._map_keys(stream, merge_item)
        return single_result(self, pool, stream.plan, outputs)

    def _merge_into(
        self, target: ArtifactTarget, pool: ModelPool, stream: TaskVectorStream
    ) -> SingleModelResult:
        """The same merge, each key written into the artifact as it finishes (by the worker
        that computed it) from a reused buffer: memory holds a few keys, not the model."""

        def write_merged(writer: ShardedWriter) -> None:
            def merge_item(item: TensorItem) -> None:
                delta = self.merge_item(item)
                out = thread_scratch().get("merged output", item.pretrained.shape, item.dtype,
                                           torch.device("cpu"))  # fmt: skip
                add_to_pretrained(item.pretrained, delta, out)
                if item.rows is None:
                    writer.write(item.key, out)
                else:
                    writer.write_rows(item.key, out, item.rows[0])

            self._map_keys(stream, merge_item)

        return self._write_artifact(target, pool, stream, write_merged)

    def _write_artifact(
        self,
        target: ArtifactTarget,
        pool: ModelPool,
        stream: TaskVectorStream,
        write_merged: Callable[[ShardedWriter], None],
    ) -> SingleModelResult:
        """The artifact of one merged model: `write_merged` writes the plan's merged keys,
        then the excluded and copied keys go in as the pretrained model has them; a failure
        leaves nothing half-written."""
        plan, pre = stream.plan, pool.pretrained
        keys = [*plan.pretrained_excluded, *plan.merged, *plan.copied]
        writer = target.writer("model", [Entry(k, pre.shape(k), pre.dtype(k)) for k in keys])
        try:
            write_merged(writer)
            for key in [*plan.pretrained_excluded, *plan.copied]:
                writer.write(key, pre.get(key))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return SingleModelResult(
            method=self.name,
            params=dict(self.params),
            tasks=pool.tasks,
            shared=target.tensors("model"),
            task_specific=task_specific_tensors(pool, plan),
        )


def add_to_pretrained(pretrained: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> None:
    """`out = pretrained + delta` (summed in their dtype, then cast to `out`'s). A sum to cast
    goes into the item's pretrained buffer, read for the last time here: a fresh tensor per
    key above glibc's mmap threshold would fault in new pages every time."""
    if out.dtype == torch.float32 and delta.device == out.device:
        torch.add(pretrained, delta, out=out)
    elif (
        torch.result_type(pretrained, delta) == pretrained.dtype and delta.shape == pretrained.shape
    ):
        out.copy_(pretrained.add_(delta))
    else:
        out.copy_(pretrained + delta)


def single_result(
    method: Method, pool: ModelPool, plan: KeyPlan, shared: dict[str, torch.Tensor]
) -> SingleModelResult:
    """Complete merged tensors with copied keys and per-task heads."""
    full = {k: pool.pretrained.get(k) for k in plan.pretrained_excluded}
    for key in plan.merged:
        full[key] = shared[key]
    for key in plan.copied:
        full[key] = pool.pretrained.get(key)
    return SingleModelResult(
        method=method.name,
        params=dict(method.params),
        tasks=pool.tasks,
        shared=full,
        task_specific=task_specific_tensors(pool, plan),
    )


def task_specific_tensors(pool: ModelPool, plan: KeyPlan) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's own tensors (heads), refused when non-finite as merged tensors are: a
    nan head would score as a model, not fail as a broken checkpoint."""
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for task, keys in plan.task_specific.items():
        source = pool.finetuned[task]
        heads[task] = {}
        for key in keys:
            tensor = source.get(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise MergeBenchError(
                    f"{source.name}: tensor {key!r} has non-finite values (nan/inf)"
                )
            heads[task][key] = tensor
    return heads


def sign(x: torch.Tensor) -> torch.Tensor:
    """`+1 if x > 0 else -1`: zero counts as negative, as the official EMR code does."""
    return torch.where(x > 0, 1.0, -1.0).to(x.dtype)
