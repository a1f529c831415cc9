"""Several stores read as one: a run's identity is its config hash, so a hash stored in
several stores counts once (the latest wins)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergebench.report.store.base import Store


def combined_results(
    stores: Sequence[Store],
    family: str | None = None,
    taskset: str | None = None,
    split: str | None = "test",
    with_runs: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`scores()` rows (and, `with_runs`, `runs()` rows) of several stores as if they were
    one. A run's identity is its config hash: a hash stored in several stores counts once,
    the latest `created_at` winning (on a tie, the store given later). With several stores
    the run ids are renumbered 1..n in `created_at` order, so "the latest run of a label
    wins" holds across stores; one store keeps its own ids."""
    if len(stores) == 1:
        (store,) = stores
        runs = store.runs(family=family, taskset=taskset) if with_runs else []
        return store.scores(family=family, taskset=taskset, split=split), runs
    score_sets = [s.scores(family=family, taskset=taskset, split=split) for s in stores]
    run_sets = [s.runs(family=family, taskset=taskset) if with_runs else [] for s in stores]
    latest: dict[str, tuple[str, int, int]] = {}
    for idx, rows in enumerate(score_sets):
        for r in rows:
            cand = (r["created_at"], idx, r["run_id"])
            old = latest.get(r["config_hash"])
            if old is None or cand > old:
                latest[r["config_hash"]] = cand
    new_id = {(idx, rid): n for n, (_, idx, rid) in enumerate(sorted(latest.values()), 1)}
    scores = [
        r | {"run_id": new_id[(idx, r["run_id"])]}
        for idx, rows in enumerate(score_sets)
        for r in rows
        if (idx, r["run_id"]) in new_id
    ]
    scores.sort(key=lambda r: (r["run_id"], r["position"]))
    runs = [
        r | {"run_id": new_id[(idx, r["run_id"])]}
        for idx, rows in enumerate(run_sets)
        for r in rows
        if (idx, r["run_id"]) in new_id
    ]
    runs.sort(key=lambda r: r["run_id"])
    return scores, runs
