"""lm-evaluation-harness as a library: the tasks of `taskset=lm_eval`, checked up front, and
one task scored on an in-memory causal LM with every sample's score.

A task's score is lm-eval's own number for it: the first metric (and filter) lm-eval reports
whose aggregate is the mean of its per-sample values (`acc` of a multiple_choice task,
`exact_match` of a generate_until task, ...), so that the paired bootstrap over samples
recomputes it exactly. A task with no such metric is refused.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mergebench.util.errors import MergeBenchError, first_line

# eval.lm_eval.* passed to lm_eval.simple_evaluate (batch_size goes to the model wrapper).
OPTIONS = ("batch_size", "limit", "gen_kwargs", "apply_chat_template", "num_fewshot",
           "confirm_run_unsafe_code")  # fmt: skip
UNSAFE_OPTION = "eval.lm_eval.confirm_run_unsafe_code"
_NOT_METRICS = ("alias", "name", "sample_len", "samples")
# What HFLM says every time it is handed a model instance, which is how we use it.
_EXPECTED = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized")


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's per-task INFO lines and its warnings about model instances held back;
    its other warnings and errors pass."""
    root, hf = logging.getLogger("lm_eval"), logging.getLogger("lm_eval.models.huggingface")
    level = root.level

    def expected(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED)

    root.setLevel(logging.WARNING)
    hf.addFilter(expected)
    try:
        yield
    finally:
        hf.removeFilter(expected)
        root.setLevel(level)


@dataclass(frozen=True)
class SampleScores:
    """One task's score (lm-eval's metric, e.g. `acc`) and each sample's value, by doc id."""

    metric: str
    value: float
    samples: np.ndarray


def task_manager(include_path: str | Path | None, tasks: Sequence[str]) -> Any:
    """lm-eval's task index with the local task YAMLs of `include_path`; every task name
    checked. When the local folder has every task, lm-eval's own thousands of task files
    are not indexed (that takes seconds to a minute)."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise MergeBenchError("taskset.tasks: no lm-eval tasks named")
    if include_path is not None:
        path = Path(str(include_path)).expanduser()
        if not path.is_dir():
            raise MergeBenchError(f"taskset.include_path: {path}: no such folder")
        local = TaskManager(include_path=str(path), include_defaults=False)
        if all(task in set(local.all_tasks) for task in tasks):
            return local
        manager = TaskManager(include_path=str(path))
    else:
        manager = TaskManager()
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            raise MergeBenchError(
                f"taskset.tasks: {task!r} is not an lm-eval task (neither in lm-eval's "
                "registry nor under taskset.include_path)"
            )
    return manager


def check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `eval.lm_eval` options, unknown names refused."""
    options = dict(options or {})
    for name in options:
        if name not in OPTIONS:
            raise MergeBenchError(
                f"eval.lm_eval.{name}: unknown option (choose from {', '.join(OPTIONS)})"
            )
    return {k: v for k, v in options.items() if v is not None}


def check_unsafe_code(manager: Any, tasks: Sequence[str], options: Mapping[str, Any]) -> None:
    """Tasks that run the model's generated code (lm-eval's `unsafe_code`: humaneval_plus,
    mbpp_plus, ...) only with `eval.lm_eval.confirm_run_unsafe_code=true`; refused up front,
    before any model is loaded."""
    if options.get("confirm_run_unsafe_code"):
        return
    index = manager.task_index
    unsafe = [t for t in tasks if t in index and (index[t].cfg or {}).get("unsafe_code")]
    if unsafe:
        raise MergeBenchError(
            f"taskset.tasks: {', '.join(unsafe)} execute the model's generated code: set "
            f"{UNSAFE_OPTION}=true to run them (or leave them out of taskset.tasks)"
        )


@contextmanager
def _code_eval_allowed(allowed: bool) -> Iterator[None]:
    """HF `evaluate`'s code_eval metric (lm-eval's pass@k) reads HF_ALLOW_CODE_EVAL=1; set
    only while a run that confirmed unsafe code is scored."""
    if not allowed:
        yield
        return
    before = os.environ.get("HF_ALLOW_CODE_EVAL")
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = before


def score_task(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    manager: Any,
    options: Mapping[str, Any],
    batch_size: int,
) -> SampleScores:
    """Run lm-eval's `task` on `model` (in memory, wrapped by its HFLM) with every sample
    logged; the task's score and the samples' values in doc order."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    kwargs = {k: v for k, v in options.items() if k != "batch_size"}
    try:
        with _quiet_lm_eval(), _code_eval_allowed(bool(kwargs.get("confirm_run_unsafe_code"))):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device,
                      batch_size=int(options.get("batch_size") or batch_size))  # fmt: skip
            out = simple_evaluate(lm, tasks=[task], task_manager=manager, log_samples=True,
                                  bootstrap_iters=0, **kwargs)  # fmt: skip
    except MergeBenchError:
        raise
    except Exception as err:  # lm-eval's own errors (a task's data, a bad option)
        raise MergeBenchError(f"lm-eval task {task!r}: {first_line(err)}") from None
    if out is None or task not in out.get("results", {}):
        raise MergeBenchError(f"lm-eval task {task!r}: lm-eval returned no result")
    return _mean_metric(task, out["results"][task], out["samples"][task])


def _mean_metric(task: str, results: Mapping[str, Any], samples: Sequence[Mapping]) -> SampleScores:
    """The first reported metric whose value is the mean of its samples' values."""
    for key, value in results.items():
        name, _, filt = key.partition(",")
        if name in _NOT_METRICS or name.endswith("_stderr") or not isinstance(value, int | float):
            continue
        rows = sorted((s for s in samples if s.get("filter", "none") == (filt or "none")),
                      key=lambda s: s["doc_id"])  # fmt: skip
        try:
            values = np.asarray([float(s[name]) for s in rows], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            continue  # per-sample values that are not numbers (corpus-level metrics)
        if len(values) and math.isclose(values.mean(), float(value), rel_tol=1e-9, abs_tol=1e-12):
            label = name if filt in ("", "none") else f"{name} ({filt})"
            return SampleScores(metric=label, value=float(value), samples=values)
    raise MergeBenchError(
        f"taskset.tasks: lm-eval task {task!r} reports no metric that is a mean over samples "
        f"({', '.join(k for k in results if ',' in k)}): the board's intervals need one"
    )


__all__ = [
    "OPTIONS",
    "UNSAFE_OPTION",
    "SampleScores",
    "check_options",
    "check_unsafe_code",
    "score_task",
    "task_manager",
]
