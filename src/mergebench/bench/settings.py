"""The run's own settings checked before any work: a wrong seed, thread count or task list
used to surface as a traceback from torch or int(), or worse, as a plausible run stored
under the wrong name (seed=1.5 read seed 1's zoo; tasks [mnist, mnist] merged one model)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergebench.methods.registry import method_names
from mergebench.sources.zoo.workers import check_workers
from mergebench.util.errors import MergeBenchError


def _integer(key: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    # bool is an int in Python, and 1.0 would hash differently from 1: integers only.
    if isinstance(value, bool) or not isinstance(value, int):
        raise MergeBenchError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise MergeBenchError(f"{key}: {value} must be at least {minimum}")


def check_tasks(tasks: Any, where: str = "taskset.tasks") -> list[str]:
    """A non-empty list of distinct task names."""
    if not isinstance(tasks, list | tuple) or not tasks:
        raise MergeBenchError(f"{where}: expected a non-empty list of task names, got {tasks!r}")
    seen: set[str] = set()
    for task in tasks:
        if not isinstance(task, str) or not task:
            raise MergeBenchError(f"{where}: task names must be non-empty strings, got {task!r}")
        if task in seen:
            raise MergeBenchError(
                f"{where}: task {task!r} is listed twice (a merge of one model with itself "
                "is not a merge)"
            )
        seen.add(task)
    return list(tasks)


def check_run_settings(plain: Mapping[str, Any]) -> None:
    """Seed, threads, workers, batch size, the task list and the method's name."""
    _integer("seed", plain.get("seed", 0), 0)
    _integer("threads", plain.get("threads"), 1, optional=True)
    zoo = plain.get("zoo") or {}
    if isinstance(zoo, Mapping):
        check_workers(zoo.get("workers"))
    evaluation = plain.get("eval") or {}
    if isinstance(evaluation, Mapping):
        _integer("eval.batch_size", evaluation.get("batch_size"), 1, optional=True)
    taskset = plain.get("taskset")
    if isinstance(taskset, Mapping) and "tasks" in taskset:
        check_tasks(taskset["tasks"])
    method = plain.get("method")
    if isinstance(method, Mapping):
        name = method.get("name")
        # `method=../model/minilm` makes Hydra load a config from outside the method group.
        if name not in method_names():
            raise MergeBenchError(
                f"method: {name!r} is not a method (a config from outside conf/method/?); "
                f"choose from {', '.join(method_names())}"
            )
