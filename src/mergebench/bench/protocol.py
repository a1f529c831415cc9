"""The benchmark's selection protocol: hyperparameters chosen on the validation split.

Each method's config may hold a `search:` section (`conf/method/<name>.yaml`): the values of
options that its paper selects on validation data. The benchmark merges at every grid point,
scores the validation split, keeps the best average (the first on a tie), and the job then
evaluates that pick once on the test split. Tuning-free methods (EMR) have no `search` and
run as they are.

Fixed or searched (`UserSettings`): an option the user set on the command line is fixed,
whatever its value (equal to its default or not), and so is one a config (a variant) sets
away from its default; a grid given on the command line (`method.search.k=[0.1,0.2]`, or
`[]` to search `k` no more) replaces the config's. Both are named in the row's label
(`run_label`), so they are part of the run's identity; with nothing set, label and identity
are those of the runs stored before.

    search:
      scaling: [0.1, 0.2, ...]              # a joint grid over options
      per_task: {threshold: [0.2, 0.3]}     # chosen per task by that task's validation score

Structure is used where it is exact: a method whose `scaling` only multiplies the merged
task vector (`Method.post_scaling`) is merged once per point of its other options at
scaling 1, and each scaling is `W_pre + lam * (W_1 - W_pre)`. The pick is merged again at
its exact values for the test evaluation.

A method built on another (`X w/ M&R`, `dare (X)`) first takes X's selected values.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergebench.api import merge_pool
from mergebench.engine.keyplan import plan_keys
from mergebench.engine.pool import ModelPool
from mergebench.methods.registry import (
    check_search,
    method_class,
    method_defaults,
    method_search,
    setting_text,
    variant_label,
)
from mergebench.report.records import TaskScore, average_score, primary_scores
from mergebench.results import MergeResult, SingleModelResult
from mergebench.util.errors import MergeBenchError
from mergebench.util.hashing import stable_hash
from mergebench.util.progress import stage

# result -> validation scores
Validate = Callable[[MergeResult], list[TaskScore]]


@dataclass
class Selection:
    """What the protocol chose, and every validation average it saw. `seconds` and
    `evaluated` (candidates scored) include a base method's selection (`dare (ties)`), even
    when a multirun made it for an earlier row: what the row costs on its own."""

    selected: dict[str, Any] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    merges: int = 0
    seconds: float = 0.0
    evaluated: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"selected": self.selected, "candidates": self.candidates, "merges": self.merges,
                "seconds": round(self.seconds, 2), "evaluated": self.evaluated}  # fmt: skip


def _grid(options: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    names = list(options)
    return [
        dict(zip(names, values, strict=True)) for values in itertools.product(*options.values())
    ]


@dataclass(frozen=True)
class UserSettings:
    """What the command line set in the `method` group: `options`, the option paths the
    user fixed (`k`, `base_params.k`); `grids`, the search grids the user replaced (`k`,
    `per_task.threshold`). Empty when the user set nothing."""

    options: frozenset[str] = frozenset()
    grids: frozenset[str] = frozenset()

    def nested(self, option: str) -> UserSettings:
        """The settings under `option` (a base method's `base_params`)."""
        prefix = f"{option}."
        return UserSettings(frozenset(o[len(prefix):] for o in self.options
                                      if o.startswith(prefix)))  # fmt: skip


def _leaves(path: str, value: Any) -> list[str]:
    """The dotted paths of the values a (possibly nested) override sets."""
    if isinstance(value, Mapping) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(f"{path}.{k}", v)]
    return [path]


def user_settings(overrides: Sequence[str]) -> UserSettings:
    """The method options and search grids that the Hydra overrides `overrides` (a job's
    task overrides: `method.k=0.1`, `method.search.k=[0.1,0.2]`) set; deletions and the
    method's choice (`method=ties`) set none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    options, grids = set(), set()
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_delete() or not key.startswith("method.") or key == "method.name":
            continue
        for path in _leaves(key.removeprefix("method."), override.value()):
            if path == "search" or path.startswith("search."):
                grids.add(path.removeprefix("search").removeprefix("."))  # "": the whole search
            else:
                options.add(path)
    return UserSettings(frozenset(options), frozenset(grids))


def _at(tree: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree


def _grid_text(grid: Any) -> str:
    if isinstance(grid, list):
        return f"[{', '.join(setting_text(v) for v in grid)}]"
    return setting_text(grid)


def run_label(
    name: str,
    params: Mapping[str, Any],
    search: Mapping[str, Any] | None,
    settings: UserSettings = UserSettings(),
) -> str:
    """The row label of a benchmark run: the method's label with every option that differs
    from its default or that the user set, then every grid the user replaced, e.g.
    `ties (k=0.2, search.scaling=[0.5, 1])`; a run at the defaults is plain `ties`."""
    grids = [
        f"search{'.' if path else ''}{path}={_grid_text(_at(search, path))}"
        for path in sorted(settings.grids)
    ]
    return variant_label(name, params, fixed=settings.options, extra=grids)


def searchable(
    name: str,
    params: Mapping[str, Any],
    fixed: frozenset[str] = frozenset(),
    search: Mapping[str, Any] | None = None,
) -> tuple[dict[str, list], dict[str, list]]:
    """The joint grid and the per-task options of method `name` that the protocol may
    search: those of `search` (the composed config's grid; None: the method's config) that
    the user did not set (`fixed`) and whose value in `params` is still the default. An
    empty grid searches nothing."""
    search = method_search(name) if search is None else check_search(name, search)
    defaults = method_defaults(name)

    def free(option: str) -> bool:
        return option not in fixed and params.get(option, defaults.get(option)) == defaults.get(
            option
        )

    grid = {o: list(v) for o, v in search.items() if o != "per_task" and v and free(o)}
    per_task = {o: list(v) for o, v in (search.get("per_task") or {}).items() if v and free(o)}
    return grid, per_task


class _Rescaled:
    """`W_pre + factor * (W_1 - W_pre)` on the merged keys of a single-model result merged at
    scaling 1, for any factor: the pretrained weights and the deltas are read once."""

    def __init__(self, result: MergeResult, pool: ModelPool, keys: list[str]) -> None:
        assert isinstance(result, SingleModelResult)
        self.result = result
        self.pre = {k: pool.pretrained.get(k).to(torch.float32) for k in keys}
        self.delta = {k: result.shared[k].to(torch.float32) - self.pre[k] for k in keys}

    def at(self, factor: float) -> SingleModelResult:
        result = self.result
        shared = dict(result.shared)
        for key, delta in self.delta.items():
            shared[key] = (self.pre[key] + factor * delta).to(result.shared[key].dtype)
        return SingleModelResult(result.method, dict(result.params), list(result.tasks), shared,
                                 result.task_specific, dict(result.extra))  # fmt: skip


def select(
    name: str,
    params: Mapping[str, Any],
    pool: ModelPool,
    validate: Validate,
    device: str = "cpu",
    say: Callable[[str], None] = lambda _: None,
    memo: dict[str, Selection] | None = None,
    settings: UserSettings = UserSettings(),
    search: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Selection:
    """Choose method `name`'s searchable options on validation; returns the values.

    `settings`: what the user set (fixed options); `search`: the composed config's grid
    (None: the method's config). `progress`: a line per candidate (its values, validation
    average and seconds) or, on a terminal, a bar (`util.progress.stage`). `memo` keeps selections by method, options and grid (give
    one per pool): a multirun then selects TIES once for `ties`, `dare (ties)` and
    `ties w/ M&R`."""
    search = method_search(name) if search is None else check_search(name, search)
    full = {**method_defaults(name), **dict(params)}  # defaults: one key
    key = stable_hash([name, full, sorted(settings.options), search])
    if memo is not None and key in memo:
        return memo[key]
    selection = _select(name, params, pool, validate, device, say, memo, settings, search, progress)
    if memo is not None:
        memo[key] = selection
    return selection


def _select(
    name: str,
    params: Mapping[str, Any],
    pool: ModelPool,
    validate: Validate,
    device: str,
    say: Callable[[str], None],
    memo: dict[str, Selection] | None,
    settings: UserSettings,
    search: Mapping[str, Any],
    progress: bool,
) -> Selection:
    params = dict(params)
    selection = Selection()
    cls = method_class(name)
    # A method on top of another first takes the base's own selection.
    if "base" in cls.label_options and "base" in params:
        base = str(params["base"])
        base_params = dict(params.get("base_params") or {})
        base_sel = select(base, base_params, pool, validate, device, say, memo,
                          settings.nested("base_params"), progress=progress)  # fmt: skip
        if base_sel.selected:
            merged_base = {**dict(params.get("base_params") or {}), **base_sel.selected}
            params["base_params"] = merged_base
            selection.selected["base_params"] = merged_base
        selection.merges += base_sel.merges
        selection.seconds += base_sel.seconds
        selection.evaluated += base_sel.evaluated
    grid, per_task = searchable(name, params, settings.options, search)
    if not grid and not per_task:
        return selection
    if per_task and grid:
        raise MergeBenchError(f"{name}.search: per-task options cannot be combined with a grid")
    total = len(_grid(grid)) if grid else sum(len(v) for v in per_task.values())
    start = time.perf_counter()
    with stage(total, f"{name}: validation", progress, "candidate", every=1) as bar:
        _search(name, params, pool, validate, device, say, selection, grid, per_task, bar)
    selection.seconds += time.perf_counter() - start
    selection.evaluated += len(selection.candidates)
    return selection


def _search(
    name: str,
    params: dict[str, Any],
    pool: ModelPool,
    validate: Validate,
    device: str,
    say: Callable[[str], None],
    selection: Selection,
    grid: dict[str, list],
    per_task: dict[str, list],
    bar: Any,
) -> None:
    """Merge and score every candidate of `grid` (or `per_task`), recording them in
    `selection`; one `bar` step per candidate, whose seconds are the wall time since the
    previous one (its merge included, or its share of one merge at scaling 1)."""
    cls = method_class(name)
    since = [time.perf_counter()]

    def score(values: Mapping[str, Any], result: MergeResult) -> tuple[float, dict[str, float]]:
        scores = validate(result)
        entry = {"params": dict(values), "validation_average": average_score(scores, None)}
        selection.candidates.append(entry)
        now = time.perf_counter()
        shown = ", ".join(f"{k}={setting_text(v)}" for k, v in values.items())
        bar.set_postfix_str(f"{shown}: validation {entry['validation_average']:.4f} "
                            f"in {now - since[0]:.1f} s")  # fmt: skip
        bar.update()
        since[0] = now
        return entry["validation_average"], primary_scores(scores, None)

    if per_task:
        _select_per_task(name, params, pool, per_task, selection, score, device, say)
        return
    post = cls.post_scaling if cls.post_scaling in grid else None
    outer = {o: v for o, v in grid.items() if o != post}
    keys = plan_keys(pool).merged if post else []
    best: tuple[float, dict[str, Any]] | None = None
    for point in _grid(outer):
        if post:  # one merge at scaling 1 serves every scaling of this point
            result = merge_pool(name, pool, device=device, progress=False,
                                **{**params, **point, post: 1.0})  # fmt: skip
            selection.merges += 1
            rescaled = _Rescaled(result, pool, keys)
            for factor in grid[post]:
                values = {**point, post: factor}
                average, _ = score(values, rescaled.at(float(factor)))
                if best is None or average > best[0]:
                    best = (average, values)
            continue
        result = merge_pool(name, pool, device=device, progress=False, **{**params, **point})
        selection.merges += 1
        average, _ = score(point, result)
        if best is None or average > best[0]:
            best = (average, dict(point))
    if best is not None:
        selection.selected.update(best[1])
        say(f"{name}: selected {best[1]} on validation (average {best[0]:.4f}, "
            f"{selection.merges} merges)")  # fmt: skip


def _select_per_task(
    name: str,
    params: dict[str, Any],
    pool: ModelPool,
    per_task: dict[str, list],
    selection: Selection,
    score: Callable[[Mapping[str, Any], MergeResult], tuple[float, dict[str, float]]],
    device: str,
    say: Callable[[str], None],
) -> None:
    """Each task takes the value under which its own validation score is best (the first
    maximum on a tie), as TALL masks pick their thresholds."""
    if len(per_task) != 1:
        raise MergeBenchError(f"{name}.search.per_task: one option at most")
    ((option, values),) = per_task.items()
    seen: list[tuple[Any, dict[str, float]]] = []
    for value in values:
        result = merge_pool(name, pool, device=device, progress=False, **{**params, option: value})
        selection.merges += 1
        seen.append((value, score({option: value}, result)[1]))
    choice = {}
    for task in pool.tasks:
        best = max(range(len(seen)), key=lambda i: (seen[i][1].get(task, float("-inf")), -i))
        choice[task] = seen[best][0]
    selection.selected[option] = choice
    say(f"{name}: selected {option} per task {choice} on validation")
