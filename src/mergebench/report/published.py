"""Numbers published in the EMR-Merging paper (NeurIPS 2024), quoted from
`docs/paper-results.md`, for the leaderboard's "published" column and the plots.

Data only, in `published.json` beside this module: `label_aliases` maps each paper row to
the leaderboard labels that stand for it (method registry names, reference rows, the Table 8
ablations of EMR, Table 7's masks and rescalers on top of other methods); each of `settings`
says which of our family / task-set names it matches, the paper's unit (percent or
fraction), its averages per method, and per-task numbers where the paper gives them. A
setting with `like` is that earlier setting with the fields it lists replaced: the open_clip
settings (task_vectors' checkpoints, families `openclip_*`) carry the Hugging Face CLIP
settings' numbers, and our own fine-tuned ViT-B/16 thirty-task checkpoints the paper's
(whose checkpoints are not public). Values are stored exactly as the paper prints them;
`Setting.fraction()` turns them into our unit (a fraction in [0, 1], as torchmetrics
reports).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib.resources import files
from typing import Any

from mergebench.util.errors import MergeBenchError

TABLE = "published.json"


def norm(name: str) -> str:
    """Lower-case alphanumerics only, so `ViT-B/32`, `vit_b32` and `vitb32` compare equal."""
    return re.sub(r"[^a-z0-9+]", "", name.lower())


@dataclass(frozen=True)
class Setting:
    """One experimental setting of the paper (a backbone and a task set)."""

    key: str
    title: str
    n_tasks: int  # the paper's number of tasks; a subset of them is a different setting
    families: tuple[str, ...]
    tasksets: tuple[str, ...]
    unit: str  # "percent" or "fraction": how the paper prints its numbers
    average: dict[str, float]
    tasks: tuple[str, ...] = ()
    # Aliases of each task name in `tasks` (same order), for matching our task names.
    task_aliases: tuple[tuple[str, ...], ...] = ()
    per_task: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # Number of merged tasks -> average, per method (Fig. "score against number of tasks").
    num_tasks: dict[str, dict[int, float]] = field(default_factory=dict)
    # The checkpoints the numbers were measured on (`model.lineage` of our runs, e.g.
    # `tall_masks`); None: any lineage (the EMR-Merging paper's settings).
    lineage: str | None = None
    source: str = "EMR-Merging paper"  # where the numbers are quoted from, for captions

    def fraction(self, value: float) -> float:
        return value / 100.0 if self.unit == "percent" else value

    def matches(
        self, family: str, taskset: str, n_tasks: int | None = None, lineage: str | None = None
    ) -> bool:
        if n_tasks is not None and n_tasks != self.n_tasks:
            return False
        if self.lineage is not None and lineage != self.lineage:
            return False  # numbers of other checkpoints are not comparable
        return norm(family) in {norm(f) for f in self.families} and norm(taskset) in {
            norm(t) for t in self.tasksets
        }

    def average_for(self, label: str) -> float | None:
        """The published average for a leaderboard label, as a fraction (None if absent)."""
        canon = canonical_label(label)
        if canon in self.average:
            return self.fraction(self.average[canon])
        if canon in self.per_task:  # the paper gives a per-task table but no average here
            values = self.per_task[canon]
            return self.fraction(sum(values) / len(values))
        return None

    def task_index(self, task: str) -> int | None:
        for i, aliases in enumerate(self.task_aliases):
            if norm(task) in {norm(a) for a in (self.tasks[i], *aliases)}:
                return i
        return None

    def task_score_for(self, label: str, task: str) -> float | None:
        canon = canonical_label(label)
        i = self.task_index(task)
        if canon not in self.per_task or i is None:
            return None
        return self.fraction(self.per_task[canon][i])


def _fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A setting's JSON fields as `Setting` holds them (tuples; task counts as ints)."""
    out = dict(entry)
    for name in ("families", "tasksets", "tasks"):
        if name in out:
            out[name] = tuple(out[name])
    if "task_aliases" in out:
        out["task_aliases"] = tuple(tuple(a) for a in out["task_aliases"])
    if "per_task" in out:
        out["per_task"] = {m: tuple(v) for m, v in out["per_task"].items()}
    if "num_tasks" in out:
        out["num_tasks"] = {
            m: {int(n): v for n, v in by_n.items()} for m, by_n in out["num_tasks"].items()
        }
    return out


def load_settings(name: str = TABLE) -> tuple[dict[str, list[str]], tuple[Setting, ...]]:
    """The packaged label aliases and settings (a `like` entry: that setting, replaced)."""
    table = json.loads(files(__package__).joinpath(name).read_text(encoding="utf-8"))
    settings: dict[str, Setting] = {}
    for i, entry in enumerate(table["settings"]):
        fields = _fields(entry)
        like = fields.pop("like", None)
        try:
            setting = Setting(**fields) if like is None else replace(settings[like], **fields)
        except (KeyError, TypeError) as err:
            raise MergeBenchError(f"{name}: settings[{i}] is malformed ({err})") from None
        settings[setting.key] = setting
    return table["label_aliases"], tuple(settings.values())


LABEL_ALIASES: dict[str, list[str]]
SETTINGS: tuple[Setting, ...]
LABEL_ALIASES, SETTINGS = load_settings()
_ALIAS_TO_LABEL = {norm(a): label for label, aliases in LABEL_ALIASES.items() for a in aliases}


def canonical_label(label: str) -> str | None:
    """The paper row a leaderboard label corresponds to, or None."""
    return _ALIAS_TO_LABEL.get(norm(label))


def find_setting(
    family: str, taskset: str, n_tasks: int | None = None, lineage: str | None = None
) -> Setting | None:
    """The paper setting whose backbone and task set (and number of tasks, if given) match
    ours, if any; a setting measured on one checkpoint lineage matches that lineage only."""
    for setting in SETTINGS:
        if setting.matches(family, taskset, n_tasks, lineage):
            return setting
    return None


def setting_source(key: str) -> str:
    """Where the numbers of the setting `key` are quoted from (a caption's words)."""
    return next((s.source for s in SETTINGS if s.key == key), "EMR-Merging paper")
