"""Leaderboards from the runs store: methods x tasks, average, normalized average, rank.

One board per (family, task set, set of tasks, checkpoint lineage): runs that merged a
different subset of tasks (the number-of-tasks experiment) are not comparable and get their
own board, and so are runs whose model config names another `lineage` (the fine-tunes come
from another release, e.g. FusionBench's or TALL masks' CLIP checkpoints, `LINEAGE_WHY`). Within a
board each row is a label (method or variant); when a label was run several times, the
latest run wins. Normalized score = method / `individual` on the same task (the individual
row of the same family, looked up per task, so subset boards are normalized too). Ranks
order the merging methods by average; reference rows (individual, multitask, pretrained)
are shown first and not ranked.

Seeds: the top-level config key `seed` picks the zoo's data splits and fine-tuning, so runs
of one label under several seeds are repeats of the benchmark on independent zoos. A row's
main numbers (scores, normalized scores, intervals, rank) stay those of the label's latest
run, whatever its seed; beside them `seeds`, `seed_mean` and `seed_std` summarize the
label's latest run per seed on the same board (same family, task set and set of tasks).
A run whose config has no `seed` counts as seed 0 (the config default).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebench.report.published import Setting, find_setting
from mergebench.report.records import REFERENCE_ROWS
from mergebench.report.stats import RESAMPLES, Outcome, bootstrap_rows, ranks_with_ties, tied
from mergebench.report.store import (
    DEFAULT_DB,
    Store,
    canonical_config,
    combined_results,
    is_url,
    open_store,
    redact_url,
)
from mergebench.util.errors import MergeBenchError

LINEAGE_WHY = (
    "runs of other checkpoint lineages are on boards of their own: their fine-tuned models "
    "differ, so their numbers are not comparable"
)


@dataclass
class Row:
    label: str
    method: str
    run_id: int
    scores: dict[str, float | None]
    normalized: dict[str, float | None]
    average: float | None
    normalized_average: float | None
    rank: int | None = None
    published_average: float | None = None
    published_scores: dict[str, float | None] = field(default_factory=dict)
    # From the paired bootstrap over test examples (report/stats.py); None without outcomes.
    rank_label: str | None = None  # "1", "2=" ...: rows sharing a rank are tied
    average_ci: tuple[float, float] | None = None
    scores_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    tied_with_best: bool | None = None
    selected: dict[str, Any] = field(default_factory=dict)  # chosen on validation
    base_label: str | None = None  # "X" of an "X w/ M&R" row (named by the method)
    cost: dict[str, float | None] = field(default_factory=dict)
    # Across zoo seeds: the label's latest run per seed on this board (`_seed_statistics`).
    # Mean and sample std (ddof=1) of those runs' averages and per-task scores; the mean is
    # None when any of those runs lacks the value, the std also with fewer than 2 seeds.
    seeds: list[int] = field(default_factory=list)
    seed_mean: float | None = None
    seed_std: float | None = None
    scores_seed_mean: dict[str, float | None] = field(default_factory=dict)
    scores_seed_std: dict[str, float | None] = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        return self.method in REFERENCE_ROWS


@dataclass
class Board:
    family: str
    taskset: str
    tasks: list[str]
    metrics: dict[str, str]  # task -> the metric shown (the first one the evaluator reported)
    rows: list[Row]
    published_setting: str | None = None
    lineage: str | None = None  # `model.lineage` of its runs (None: not named)

    @property
    def title(self) -> str:
        lineage = f" [{self.lineage}]" if self.lineage else ""
        return f"{self.family} / {self.taskset} ({len(self.tasks)} tasks){lineage}"

    def row(self, label: str) -> Row | None:
        return next((r for r in self.rows if r.label == label), None)

    @property
    def multi_seed(self) -> bool:
        """Whether any row was run under two or more seeds (then renderers show the seed
        columns; a single-seed board renders as it always did)."""
        return any(len(r.seeds) > 1 for r in self.rows)


def _mean(values: Iterable[float | None]) -> float | None:
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return None  # an incomplete row has no comparable average
    return sum(vals) / len(vals)  # type: ignore[arg-type]


def seed_mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) across seeds: (None, None) when there is
    no value or any is missing, std None with a single value."""
    if not values or any(v is None for v in values):
        return None, None
    vals = [float(v) for v in values]  # type: ignore[arg-type]
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def run_seed(run: Mapping[str, Any]) -> int:
    """The zoo seed of a `Store.runs()` row: its config's top-level `seed`, 0 when absent
    (the default of conf/config.yaml) or not an integer."""
    seed = (run.get("config") or {}).get("seed")
    if isinstance(seed, bool):
        return 0
    if isinstance(seed, int):
        return seed
    if isinstance(seed, float) and seed.is_integer():
        return int(seed)
    try:
        return int(str(seed))
    except ValueError:
        return 0


def run_lineage(run: Mapping[str, Any]) -> str | None:
    """The checkpoint lineage of a `Store.runs()` row: its config's `model.lineage`."""
    model = (run.get("config") or {}).get("model")
    value = model.get("lineage") if isinstance(model, Mapping) else None
    return str(value) if value else None


def build_boards(
    score_rows: Sequence[dict[str, Any]],
    seeds: Mapping[int, int] | None = None,
    lineages: Mapping[int, str | None] | None = None,
) -> list[Board]:
    """Boards from `Store.scores()` rows (pure: no database access). `seeds` maps
    run id -> zoo seed (`run_seed` of each stored run); runs it lacks count as seed 0.
    `lineages` maps run id -> checkpoint lineage (`run_lineage`); runs it lacks have none."""
    lineages = lineages or {}
    # run_id -> its identity and {task: {metric: value}} in reported order
    runs: dict[int, dict[str, Any]] = {}
    for s in score_rows:
        run = runs.setdefault(
            s["run_id"],
            {k: s[k] for k in ("run_id", "method", "label", "family", "taskset")} | {"tasks": {}},
        )
        run["tasks"].setdefault(s["task"], {})[s["metric"]] = s["value"]
    for run in runs.values():
        run["lineage"] = lineages.get(run["run_id"])

    # Individual scores per (family, lineage, task, metric), latest run wins: the
    # normalization base.
    individual: dict[tuple[str, str | None, str, str], float | None] = {}
    for run in sorted(runs.values(), key=lambda r: r["run_id"]):
        if run["method"] == "individual":
            for task, metrics in run["tasks"].items():
                for metric, value in metrics.items():
                    individual[(run["family"], run["lineage"], task, metric)] = value

    groups: dict[tuple[str, str, frozenset[str], str | None], list[dict[str, Any]]] = {}
    for run in sorted(runs.values(), key=lambda r: r["run_id"]):
        key = (run["family"], run["taskset"], frozenset(run["tasks"]), run["lineage"])
        groups.setdefault(key, []).append(run)

    boards = []
    for (family, taskset, _, lineage), group in groups.items():
        tasks = list(group[0]["tasks"])
        metrics = {t: next(iter(group[0]["tasks"][t])) for t in tasks}
        latest = {run["label"]: run for run in group}  # later runs overwrite earlier ones
        setting = find_setting(family, taskset, len(tasks), lineage)
        rows = [
            _make_row(run, tasks, metrics, individual, (family, lineage), setting)
            for run in latest.values()
        ]
        _seed_statistics(rows, group, tasks, metrics, seeds or {})
        _rank(rows)
        rows.sort(key=_row_order)
        key = setting.key if setting else None
        boards.append(Board(family, taskset, tasks, metrics, rows, key, lineage))
    boards.sort(key=lambda b: (b.family, b.taskset, -len(b.tasks), b.lineage or ""))
    return boards


def _make_row(
    run: dict[str, Any],
    tasks: list[str],
    metrics: dict[str, str],
    individual: dict[tuple[str, str | None, str, str], float | None],
    checkpoints: tuple[str, str | None],
    setting: Setting | None,
) -> Row:
    scores = {t: run["tasks"].get(t, {}).get(metrics[t]) for t in tasks}
    normalized: dict[str, float | None] = {}
    for t in tasks:
        base = individual.get((*checkpoints, t, metrics[t]))
        value = scores[t]
        normalized[t] = value / base if value is not None and base else None
    row = Row(
        label=run["label"],
        method=run["method"],
        run_id=run["run_id"],
        scores=scores,
        normalized=normalized,
        average=_mean(scores.values()),
        normalized_average=_mean(normalized.values()),
    )
    if setting is not None:
        row.published_average = setting.average_for(row.label)
        row.published_scores = {t: setting.task_score_for(row.label, t) for t in tasks}
    return row


def _seed_statistics(
    rows: Sequence[Row],
    group: Sequence[dict[str, Any]],
    tasks: list[str],
    metrics: dict[str, str],
    seeds: Mapping[int, int],
) -> None:
    """Per row: the label's latest run of each seed within the board's runs (`group`, in run
    order, so a rerun of a seed replaces that seed's value), their mean and sample std."""
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for run in group:
        per_seed.setdefault(run["label"], {})[seeds.get(run["run_id"], 0)] = run
    for row in rows:
        by_seed = per_seed.get(row.label, {})
        row.seeds = sorted(by_seed)
        scores = [
            {t: by_seed[s]["tasks"].get(t, {}).get(metrics[t]) for t in tasks} for s in row.seeds
        ]
        row.seed_mean, row.seed_std = seed_mean_std([_mean(sc.values()) for sc in scores])
        for t in tasks:
            row.scores_seed_mean[t], row.scores_seed_std[t] = seed_mean_std(
                [sc[t] for sc in scores]
            )


def _rank(rows: list[Row]) -> None:
    """Competition ranking (1, 2, 2, 4) of merging methods by average."""
    ranked = sorted(
        (r for r in rows if not r.is_reference and r.average is not None),
        key=lambda r: -r.average,  # type: ignore[operator]
    )
    for i, row in enumerate(ranked):
        prev = ranked[i - 1] if i else None
        row.rank = prev.rank if prev and prev.average == row.average else i + 1


def _row_order(row: Row) -> tuple[int, int, str]:
    if row.is_reference:
        return (0, REFERENCE_ROWS.index(row.method), row.label)
    return (1, row.rank if row.rank is not None else 10**9, row.label)


StoreSpec = str | os.PathLike | Store


def load_boards(
    db: StoreSpec | Sequence[StoreSpec] = DEFAULT_DB,
    family: str | None = None,
    taskset: str | None = None,
    all_runs: bool = False,
    strict: bool = False,
    volatile_keys: Collection[str] = (),
) -> list[Board]:
    """Boards from the store at `db` (a path, a `sqlite:///` or `postgresql://` URL, or a
    `Store`), or from the union of several stores: a config hash stored twice counts once,
    the latest `created_at` winning. Stores are opened read-only: nothing is created, and a
    database mergebench did not create is an error. With `all_runs`, every run of a label is a
    row of its own, named by the config values that tell the runs apart (a hyperparameter
    sweep). `strict`: a `family`/`taskset` filter that matches nothing while the stores hold
    other results is an error naming what is stored (the CLI's `--family` typo check).
    `volatile_keys`: config keys never named in `all_runs` labels (the benchmark's)."""
    specs = [db] if isinstance(db, str | os.PathLike | Store) else list(db)
    stores = [_open_for_reading(spec) for spec in specs]
    rows, runs = combined_results(stores, family=family, taskset=taskset, with_runs=True)
    if strict and not rows and (family or taskset):
        _explain_empty(stores, family, taskset)
    if all_runs:
        names = variant_labels(runs, volatile_keys)
        rows = [r | {"label": names.get(r["run_id"], r["label"])} for r in rows]
    boards = build_boards(
        rows,
        seeds={r["run_id"]: run_seed(r) for r in runs},
        lineages={r["run_id"]: run_lineage(r) for r in runs},
    )
    attach_run_details(boards, runs)
    return boards


def attach_run_details(
    boards: Sequence[Board], runs: Sequence[dict[str, Any]], resamples: int = RESAMPLES
) -> None:
    """Cost, selected hyperparameters and bootstrap statistics of every row, from the
    stored runs (`Store.runs()` rows: columns plus decoded `config` and `extra`)."""
    by_id = {r["run_id"]: r for r in runs}
    for board in boards:
        outcomes: dict[str, dict[str, Outcome]] = {}
        for row in board.rows:
            run = by_id.get(row.run_id)
            if run is None:
                continue
            extra = run.get("extra") or {}
            row.selected = dict(extra.get("selected") or {})
            row.base_label = extra.get("base_label")
            row.cost = _cost(run, extra)
            stored = extra.get("outcomes") or {}
            if all(t in stored for t in board.tasks):
                outcomes[row.label] = {t: Outcome.from_json(stored[t]) for t in board.tasks}
        _attach_statistics(board, outcomes, resamples)


def _cost(run: dict[str, Any], extra: dict[str, Any]) -> dict[str, float | None]:
    def mib(value: Any) -> float | None:
        return round(value / 2**20, 1) if value else None

    is_merge = run["method"] not in REFERENCE_ROWS
    rate = extra.get("examples_per_second")
    # `extra["cost"]` (bench.job.run_cost): absent in rows stored before it, shown blank
    cost = (extra.get("cost") or {}) if is_merge else {}
    merge_peak = cost.get("merge_peak_bytes")
    return {
        "merge_seconds": round(run["merge_seconds"], 2)
        if is_merge and run.get("merge_seconds")
        else None,
        "selection_seconds": cost.get("selection_seconds"),
        "selection_candidates": cost.get("selection_candidates"),
        "merge_rss_mib": None if merge_peak is None else round(merge_peak / 2**20, 1),
        "peak_rss_mib": mib(run.get("peak_rss_bytes")) if is_merge else None,
        "artifact_mib": mib(run.get("artifact_bytes")) if is_merge else None,
        "eval_examples_per_second": round(rate, 1) if isinstance(rate, int | float) else None,
    }


def _attach_statistics(
    board: Board, outcomes: dict[str, dict[str, Outcome]], resamples: int
) -> None:
    if not outcomes:
        return
    try:
        stats = bootstrap_rows(outcomes, board.tasks, resamples=resamples)
    except ValueError:  # rows scored on different test sets: no paired statistics
        return
    for row in board.rows:
        if row.label in stats:
            row.average_ci = stats[row.label].average_ci
            row.scores_ci = stats[row.label].scores_ci
    ranked = [
        r for r in board.rows if not r.is_reference and r.label in stats and r.average is not None
    ]
    if not ranked:
        return
    ranked.sort(key=lambda r: -r.average)  # type: ignore[operator]
    draws = {r.label: stats[r.label].draws for r in ranked}
    labels = ranks_with_ties(draws, [r.label for r in ranked])
    best = draws[ranked[0].label]
    for row in ranked:
        row.rank_label = labels[row.label]
        row.tied_with_best = row is ranked[0] or tied(draws[row.label], best)


def _open_for_reading(spec: StoreSpec) -> Store:
    if isinstance(spec, Store) or is_url(spec):
        return open_store(spec, readonly=True)
    path = Path(spec)
    if not path.is_file():
        raise MergeBenchError(  # a libpq string given as a path may hold a password
            f"--db {redact_url(str(path))}: no results database there (run `make bench` first)"
        )
    return open_store(path, readonly=True)


def _explain_empty(stores: Sequence[Store], family: str | None, taskset: str | None) -> None:
    """Raise a one-line error naming the families (or a family's task sets) that are stored,
    when the stores hold any results at all."""
    settings = sorted({s for store in stores for s in store.settings()})
    if not settings:
        return  # nothing stored yet: an empty board, not a typo
    where = ", ".join(store.location for store in stores)
    families = sorted({f for f, _ in settings})
    if family and family not in families:
        raise MergeBenchError(
            f"no results for family {family!r} in {where}; families stored: " + ", ".join(families)
        )
    pairs = [(f, t) for f, t in settings if not family or f == family]
    known = ", ".join(sorted({t if family else f"{f}/{t}" for f, t in pairs}))
    raise MergeBenchError(
        f"no test results for family {family or 'any'!r} taskset {taskset or 'any'!r} in "
        f"{where}; task sets stored{f' for {family}' if family else ''}: {known}"
    )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(node, sort_keys=True)}


def variant_labels(
    runs: Sequence[dict[str, Any]], volatile_keys: Collection[str] = ()
) -> dict[int, str]:
    """run_id -> `label (key=value, ...)` for labels that several configs share, listing
    only the config values that differ between them (e.g. `ties (method.k=0.1)`), less
    `volatile_keys` (where and how a run reported)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["family"], run["taskset"], run["label"]), []).append(run)
    names: dict[int, str] = {}
    for (_, _, label), group in groups.items():
        if len(group) < 2:
            continue
        flat = [_flatten(canonical_config(r["config"], volatile=volatile_keys)) for r in group]
        keys = sorted({k for f in flat for k in f})
        differing = [k for k in keys if len({f.get(k) for f in flat}) > 1]
        for run, f in zip(group, flat, strict=True):
            parts = [f"{k}={f.get(k, '-')}" for k in differing]
            names[run["run_id"]] = f"{label} ({', '.join(parts)})" if parts else label
    return names
