"""PNG plots of leaderboards: per-task bars, a methods x tasks heat map, the EMR ablation,
and score against the number of merged tasks.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no
display needed), so plots can be made inside multirun jobs and on headless machines.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mergebench.report.boards import Board, Row
from mergebench.report.published import canonical_label, find_setting
from mergebench.util.fs import atomic_file

ABLATION_METHODS = ("emr", "mask_rescale")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    FigureCanvasAgg(fig)  # atomic: never leave half a PNG behind
    return atomic_file(
        Path(path), lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    )


def _pct(value: float | None) -> float:
    return float("nan") if value is None else 100.0 * value


def plot_task_bars(board: Board, path: str | os.PathLike[str]) -> Path:
    """Grouped bars: one group per task (plus the average), one bar per method."""
    groups = [*board.tasks, "average"]
    n = max(1, len(board.rows))
    width = 0.8 / n
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) + 0.15 * n * len(groups)), 4.2))
    ax = fig.add_subplot()
    for i, row in enumerate(board.rows):
        values = [_pct(row.scores[t]) for t in board.tasks] + [_pct(row.average)]
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=row.label)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title(board.title)
    ax.legend(fontsize="small", ncols=min(4, n), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return _save(fig, path)


def plot_heatmap(board: Board, path: str | os.PathLike[str], normalized: bool = True) -> Path:
    """Methods x tasks; normalized scores (% of individual) when available, raw otherwise."""
    use_norm = normalized and any(v is not None for r in board.rows for v in r.normalized.values())
    cols = [*board.tasks, "avg"]

    def cell(row: Row, col: str) -> float | None:
        if col == "avg":
            return row.normalized_average if use_norm else row.average
        return row.normalized[col] if use_norm else row.scores[col]

    data = [[_pct(cell(r, c)) for c in cols] for r in board.rows]
    fig = Figure(figsize=(1.0 + 0.9 * len(cols), 1.0 + 0.45 * max(1, len(board.rows))))
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(board.rows)), [r.label for r in board.rows])
    low, high = image.get_clim()
    for i, values in enumerate(data):
        for j, v in enumerate(values):
            if v == v:  # skip NaN
                # dark text on the bright (yellow) end of viridis, white on the dark end
                bright = high > low and (v - low) / (high - low) > 0.6
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if bright else "white")  # fmt: skip
    fig.colorbar(image, ax=ax, label="% of individual" if use_norm else "score (%)")
    ax.set_title(board.title)
    return _save(fig, path)


def ablation_rows(board: Board) -> list[Row]:
    """EMR variants, and every `X w/ M&R` row next to its base method X."""
    rows = [r for r in board.rows if r.method in ABLATION_METHODS]
    bases = set()
    for r in rows:
        if r.method == "mask_rescale":
            bases.add(r.label.split(" w/ ")[0].strip())
    return [r for r in board.rows if r in rows or r.label in bases]


def plot_emr_ablation(board: Board, path: str | os.PathLike[str]) -> Path | None:
    """Average per ablation variant (paper Tables 7 and 8); published numbers as markers."""
    rows = ablation_rows(board)
    if len(rows) < 2:  # nothing to compare EMR with
        return None
    fig = Figure(figsize=(max(5.0, 0.9 * len(rows) + 1.5), 4.0))
    ax = fig.add_subplot()
    xs = range(len(rows))
    ax.bar(xs, [_pct(r.average) for r in rows], color="tab:blue", label="mergebench")
    published = [_pct(r.published_average) for r in rows]
    if any(p == p for p in published):
        ax.scatter(xs, published, marker="_", s=400, color="tab:red", label="published", zorder=3)
    ax.set_xticks(list(xs), [r.label for r in rows], rotation=30, ha="right")
    ax.set_ylabel("average score (%)")
    ax.set_title(f"EMR ablation: {board.title}")
    ax.legend(fontsize="small")
    return _save(fig, path)


def num_tasks_series(boards: Sequence[Board], family: str) -> dict[str, list[tuple[int, float]]]:
    """label -> [(number of tasks, average)] over the boards of `family` whose tasks are a
    subset of that family's largest board (the number-of-tasks experiment)."""
    own = [b for b in boards if b.family == family]
    if not own:
        return {}
    full = max(own, key=lambda b: len(b.tasks))
    series: dict[str, dict[int, list[float]]] = {}
    for b in own:
        if not set(b.tasks) <= set(full.tasks):
            continue
        for r in b.rows:
            if r.average is not None and not r.is_reference:
                series.setdefault(r.label, {}).setdefault(len(b.tasks), []).append(r.average)
    # several subsets of one size (different task combinations) are averaged, as the paper does
    return {
        label: sorted((n, sum(v) / len(v)) for n, v in by_n.items())
        for label, by_n in series.items()
    }


def plot_num_tasks(
    boards: Sequence[Board], family: str, path: str | os.PathLike[str]
) -> Path | None:
    """Average score against the number of merged tasks, per method (and the paper's curve
    where the family and task set match a published setting)."""
    series = {k: v for k, v in num_tasks_series(boards, family).items() if len(v) >= 2}
    if not series:
        return None
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    full = max((b for b in boards if b.family == family), key=lambda b: len(b.tasks))
    setting = find_setting(family, full.taskset)
    for label, points in series.items():
        (line,) = ax.plot(
            [n for n, _ in points], [100 * v for _, v in points], marker="o", label=label
        )
        published = setting.num_tasks.get(canonical_label(label) or "") if setting else None
        if published:
            ns = sorted(published)
            values = [100 * setting.fraction(published[n]) for n in ns]
            ax.plot(
                ns,
                values,
                ls="--",
                marker="x",
                color=line.get_color(),
                label=f"{label} (published)",
            )
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel("average score (%)")
    ax.set_title(f"Score against number of tasks: {family}")
    ax.legend(fontsize="small")
    return _save(fig, path)


def write_all_plots(boards: Sequence[Board], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Every plot that the stored results support; returns the files written."""
    out = Path(out_dir)
    written: list[Path] = []
    for b in boards:
        stem = f"{_slug(b.family)}_{_slug(b.taskset)}_{len(b.tasks)}tasks"
        written.append(plot_task_bars(b, out / f"{stem}_bars.png"))
        written.append(plot_heatmap(b, out / f"{stem}_heatmap.png"))
        ablation = plot_emr_ablation(b, out / f"{stem}_emr_ablation.png")
        if ablation:
            written.append(ablation)
    for family in sorted({b.family for b in boards}):
        curve = plot_num_tasks(boards, family, out / f"{_slug(family)}_num_tasks.png")
        if curve:
            written.append(curve)
    return written


def plot_weight_stats(stats: Sequence[Any], path: str | os.PathLike[str], title: str = "") -> Path:
    """EMR-Merging Fig. 5: per task, one bar per method for sign conflicts (%), L2 distance
    and cosine similarity to the fine-tuned weights (three panels)."""
    methods = list(dict.fromkeys(s.method for s in stats))
    tasks = list(dict.fromkeys(s.task for s in stats))
    by_key = {(s.method, s.task): s for s in stats}
    panels = (
        ("sign_conflicts", "sign conflicts (%)", 100.0),
        ("l2_distance", "L2 distance", 1.0),
        ("cosine", "cosine similarity", 1.0),
    )
    fig = Figure(figsize=(max(7.0, 1.2 * len(tasks) * 1.0 + 2), 9.0))
    width = 0.8 / max(1, len(methods))
    for p, (attr, ylabel, scale) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, p + 1)
        for i, method in enumerate(methods):
            xs = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(tasks))]
            values = [
                scale * getattr(by_key[(method, task)], attr)
                if (method, task) in by_key
                else float("nan")
                for task in tasks
            ]
            ax.bar(xs, values, width, label=method)
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(tasks)), tasks if p == len(panels) - 1 else [""] * len(tasks))
        if p == 0:
            ax.set_title(f"Merged vs fine-tuned weights{': ' + title if title else ''}")
    last = fig.axes[-1]
    last.tick_params(axis="x", labelrotation=30)
    # below the panels, where it covers no bar
    last.legend(fontsize="small", ncols=min(5, len(methods)), loc="upper center",
                bbox_to_anchor=(0.5, -0.55))  # fmt: skip
    return _save(fig, path)


def plot_storage(reports: Sequence[Any], path: str | os.PathLike[str], title: str = "") -> Path:
    """Bytes to serve every task, per method, against N separate fine-tuned models."""
    labels = [r.method for r in reports] + ["separate models"]
    values = [r.serving_bytes / 1e6 for r in reports]
    values.append(reports[0].separate_bytes / 1e6 if reports else float("nan"))
    fig = Figure(figsize=(max(5.0, 0.9 * len(labels) + 1.5), 4.0))
    ax = fig.add_subplot()
    colors = ["tab:blue"] * len(reports) + ["tab:gray"]
    ax.bar(range(len(labels)), values, color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("MB to serve all tasks")
    ax.set_title(f"Storage{': ' + title if title else ''}")
    return _save(fig, path)
