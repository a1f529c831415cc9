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


REFERENCE_GREY = ("#4d4d4d", "#8c8c8c", "#bdbdbd")  # individual, multitask, pretrained


def row_colors(rows: Sequence[Row]) -> dict[str, Any]:
    """A colour per row, none repeated: reference rows in greys, methods from tab20 without
    its grey pair (a grey method read as a reference row; dark shades first; hsv steps
    beyond 18 methods)."""
    import matplotlib

    methods = [r for r in rows if not r.is_reference]
    tab20 = [c for c in matplotlib.colormaps["tab20"].colors if len(set(c)) > 1]  # no greys
    if len(methods) <= len(tab20):
        palette: list[Any] = tab20[0::2] + tab20[1::2]
    else:
        hsv = matplotlib.colormaps["hsv"]
        palette = [hsv(i / len(methods)) for i in range(len(methods))]
    references = [r for r in rows if r.is_reference]
    greys = [
        REFERENCE_GREY[i] if i < len(REFERENCE_GREY) else "#d9d9d9" for i in range(len(references))
    ]
    colors = {r.label: g for r, g in zip(references, greys, strict=True)}
    colors.update({r.label: c for r, c in zip(methods, palette, strict=False)})
    return colors


def _error(row: Row, value: float | None, ci: tuple[float, float] | None) -> tuple[float, float]:
    """Distances below and above the value to its interval, in percent (0 without one)."""
    if value is None or ci is None:
        return 0.0, 0.0
    return max(0.0, 100 * (value - ci[0])), max(0.0, 100 * (ci[1] - value))


def _spread_limits(values: Sequence[float], margin: float = 0.15) -> tuple[float, float]:
    """y-limits that show the spread of `values` (not from 0), clipped to [0, 100]."""
    finite = [v for v in values if v == v]
    if not finite:
        return 0.0, 100.0
    low, high = min(finite), max(finite)
    pad = max(1.0, (high - low) * margin)
    return max(0.0, low - pad), min(100.0, high + pad)


def plot_task_bars(board: Board, path: str | os.PathLike[str]) -> Path:
    """Grouped bars: one group per task (plus the average), one bar per row, with the
    bootstrap 95% intervals as error bars; the y-axis shows the spread."""
    groups = [*board.tasks, "average"]
    n = max(1, len(board.rows))
    width = 0.8 / n
    colors = row_colors(board.rows)
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) + 0.15 * n * len(groups)), 4.4))
    ax = fig.add_subplot()
    shown: list[float] = []
    for i, row in enumerate(board.rows):
        values = [row.scores[t] for t in board.tasks] + [row.average]
        cis = [row.scores_ci.get(t) for t in board.tasks] + [row.average_ci]
        errors = [_error(row, v, ci) for v, ci in zip(values, cis, strict=True)]
        heights = [_pct(v) for v in values]
        shown += [h - e[0] for h, e in zip(heights, errors, strict=True)]
        shown += [h + e[1] for h, e in zip(heights, errors, strict=True)]
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(
            xs, heights, width, label=row.label, color=colors[row.label],
            yerr=[[e[0] for e in errors], [e[1] for e in errors]],
            error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "black"},
        )  # fmt: skip
    ax.set_ylim(*_spread_limits(shown))
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("score (%), 95% CI")
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


# Paper Table 8: EMR's ablations, in the paper's order.
EMR_ABLATION = ("emr (elect)", "emr (elect+mask)", "emr (elect+rescale)", "emr")


def ablation_rows(board: Board) -> list[Row]:
    """EMR's ablations in Table 8's order (Elect, E+M, E+R, EMR)."""
    return [row for label in EMR_ABLATION if (row := board.row(label)) is not None]


def mask_rescale_pairs(board: Board) -> list[tuple[Row, Row]]:
    """Table 7: each method X beside "X w/ M&R" (paired by the base label the M&R row
    recorded, never by parsing labels)."""
    pairs = []
    for row in board.rows:
        if row.base_label and (base := board.row(row.base_label)) is not None:
            pairs.append((base, row))
    return pairs


def _bar_with_ci(ax: Any, x: float, row: Row, color: Any, width: float, label: str | None):
    value = row.average
    low, high = _error(row, value, row.average_ci)
    ax.bar([x], [_pct(value)], width, color=color, label=label, yerr=[[low], [high]],
           error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "black"})  # fmt: skip
    return [_pct(value) - low, _pct(value) + high]


def plot_emr_ablation(board: Board, path: str | os.PathLike[str]) -> Path | None:
    """Paper Table 8 (EMR: Elect, E+M, E+R, all three) and Table 7 (each X beside X w/ M&R)
    as bars of the average with 95% intervals; published numbers as red ticks."""
    ablation = ablation_rows(board)
    pairs = mask_rescale_pairs(board)
    if len(ablation) < 2 and not pairs:
        return None
    panels = [
        p
        for p in ("ablation", "pairs")
        if (p == "ablation" and len(ablation) >= 2) or (p == "pairs" and pairs)
    ]
    fig = Figure(figsize=(5.0 * len(panels) + 1.0, 4.2))
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        shown: list[float] = []
        ticks, names, published = [], [], []
        if panel == "ablation":
            for i, row in enumerate(ablation):
                shown += _bar_with_ci(ax, i, row, "tab:blue", 0.6, None)
                ticks.append(i)
                names.append(row.label)
                published.append((i, row.published_average))
            ax.set_title("EMR ablation (Table 8)")
        else:
            for i, (base, mr) in enumerate(pairs):
                first = i == 0
                shown += _bar_with_ci(
                    ax, 2 * i - 0.2, base, "tab:gray", 0.4, "X" if first else None
                )
                shown += _bar_with_ci(
                    ax, 2 * i + 0.2, mr, "tab:blue", 0.4, "X w/ M&R" if first else None
                )
                ticks.append(2 * i)
                names.append(base.label)
                published += [
                    (2 * i - 0.2, base.published_average),
                    (2 * i + 0.2, mr.published_average),
                ]
            ax.set_xlim(-1, 2 * len(pairs) - 1)
            ax.set_title("Masks & rescalers on X (Table 7)")
            ax.legend(fontsize="small", loc="best")
        marks = [(x, _pct(v)) for x, v in published if v is not None]
        if marks:
            ax.scatter([x for x, _ in marks], [y for _, y in marks], marker="_", s=300,
                       color="tab:red", zorder=3, label="published")  # fmt: skip
            shown += [y for _, y in marks]
        ax.set_xticks(ticks, names, rotation=30, ha="right")
        ax.set_ylim(*_spread_limits(shown))
        ax.set_ylabel("average score (%), 95% CI")
    fig.suptitle(board.title)
    return _save(fig, path)


def num_tasks_series(boards: Sequence[Board], family: str) -> dict[str, list[tuple[int, float]]]:
    """label -> [(number of tasks, normalized average)] over the boards of `family` whose
    tasks are a subset of that family's largest board (the number-of-tasks experiment).
    Normalized (% of each task's individual model), because different subsets of tasks have
    different raw averages; several subsets of one size are averaged, as the paper does."""
    own = [b for b in boards if b.family == family]
    if not own:
        return {}
    full = max(own, key=lambda b: len(b.tasks))
    series: dict[str, dict[int, list[float]]] = {}
    for b in own:
        if not set(b.tasks) <= set(full.tasks):
            continue
        for r in b.rows:
            if r.normalized_average is not None and not r.is_reference:
                series.setdefault(r.label, {}).setdefault(len(b.tasks), []).append(
                    r.normalized_average
                )
    return {
        label: sorted((n, sum(v) / len(v)) for n, v in by_n.items())
        for label, by_n in series.items()
    }


def plot_num_tasks(
    boards: Sequence[Board], family: str, path: str | os.PathLike[str]
) -> Path | None:
    """Normalized average against the number of merged tasks, per method, with integer
    ticks (and the paper's curve, divided by its individual average, where the family and
    task set match a published setting)."""
    series = {k: v for k, v in num_tasks_series(boards, family).items() if len(v) >= 2}
    if not series:
        return None
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    full = max((b for b in boards if b.family == family), key=lambda b: len(b.tasks))
    setting = find_setting(family, full.taskset, lineage=full.lineage)
    colors = row_colors([r for r in full.rows if r.label in series] or [])
    counts: set[int] = set()
    for label, points in series.items():
        counts.update(n for n, _ in points)
        (line,) = ax.plot([n for n, _ in points], [100 * v for _, v in points], marker="o",
                          label=label, color=colors.get(label))  # fmt: skip
        published = setting.num_tasks.get(canonical_label(label) or "") if setting else None
        individual = setting.average.get("individual") if setting else None
        if published and individual:
            ns = sorted(published)
            counts.update(ns)
            ax.plot(ns, [100 * published[n] / individual for n in ns], ls="--", marker="x",
                    color=line.get_color(), label=f"{label} (published)")  # fmt: skip
    ax.set_xticks(sorted(counts))
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel("normalized average (% of individual)")
    ax.set_title(f"Score against number of tasks: {family}")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_stem(board: Board) -> str:
    """The file name stem of a board's plots (the HTML page finds them by it)."""
    return f"{_slug(board.family)}_{_slug(board.taskset)}_{len(board.tasks)}tasks"


def write_all_plots(boards: Sequence[Board], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Every plot that the stored results support; returns the files written."""
    out = Path(out_dir)
    written: list[Path] = []
    for b in boards:
        stem = plot_stem(b)
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
