"""Leaderboards rendered: terminal table, Markdown, CSV, JSON and a sortable HTML page with
the plots embedded; `write_leaderboard` writes them from the store."""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mergebench.report.boards import DEFAULT_DB, LINEAGE_WHY, Board, Row, load_boards
from mergebench.report.plots import plot_stem
from mergebench.report.published import setting_source
from mergebench.report.stats import RESAMPLES
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import atomic_write_text


def _as_percent(board: Board) -> bool:
    """Show values as percentages when every value is a fraction (accuracy, F1, MCC...)."""
    values = [v for r in board.rows for v in r.scores.values() if v is not None]
    return all(-1.0 <= v <= 1.0 for v in values)


def _fmt(value: float | None, percent: bool) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _fmt_rank(row: Row) -> str:
    if row.rank_label is not None:
        return row.rank_label
    return "—" if row.rank is None else str(row.rank)


def _fmt_ci(ci: tuple[float, float] | None, percent: bool) -> str:
    if ci is None:
        return "—"
    return f"{_fmt(ci[0], percent)}–{_fmt(ci[1], percent)}"


def _fmt_seeds(mean: float | None, std: float | None, n: int, percent: bool) -> str:
    """`mean ± std (n seeds)` across zoo seeds; no `± std` with one seed."""
    if not n:
        return "—"
    spread = f" ± {_fmt(std, percent)}" if std is not None else ""
    return f"{_fmt(mean, percent)}{spread} ({n} seed{'s' if n > 1 else ''})"


def _fmt_row_seeds(row: Row, percent: bool) -> str:
    return _fmt_seeds(row.seed_mean, row.seed_std, len(row.seeds), percent)


def _fmt_cost(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


# The boards' cost columns: header, key of `Row.cost`, digits. The process's resident peak
# (`peak_rss_mib`) is in the CSV and JSON only: it counts what the process held before.
COSTS = (
    ("merge s", "merge_seconds", 1),
    ("select s", "selection_seconds", 1),
    ("candidates", "selection_candidates", 0),
    ("merge RSS MiB", "merge_rss_mib", 0),
    ("artifact MiB", "artifact_mib", 1),
    ("eval ex/s", "eval_examples_per_second", 0),
)
COST_COLUMNS = tuple(header for header, _, _ in COSTS)
SEEDS_COLUMN = "seeds mean ± std"  # shown only on boards with a row run under 2+ seeds


def _header(board: Board) -> list[str]:
    cols = ["rank", "method", *board.tasks, "avg", "95% CI"]
    if board.multi_seed:
        cols.append(SEEDS_COLUMN)
    cols += ["norm. avg", "selected"]
    cols += list(COST_COLUMNS)
    if board.published_setting:
        cols.append("published avg")
    return cols


def _setting_text(value: Any) -> str:
    if isinstance(value, dict):  # e.g. base_params, or a per-task threshold
        return "(" + ", ".join(f"{k}={_setting_text(v)}" for k, v in value.items()) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _selected_text(row: Row) -> str:
    return ", ".join(f"{k}={_setting_text(v)}" for k, v in row.selected.items()) or "—"


def _cells(board: Board, row: Row, percent: bool) -> list[str]:
    cells = [_fmt_rank(row), row.label]
    cells += [_fmt(row.scores[t], percent) for t in board.tasks]
    cells += [_fmt(row.average, percent), _fmt_ci(row.average_ci, percent)]
    if board.multi_seed:
        cells.append(_fmt_row_seeds(row, percent))
    cells += [_fmt(row.normalized_average, True), _selected_text(row)]
    cells += [_fmt_cost(row.cost.get(key), digits) for _, key, digits in COSTS]
    if board.published_setting:
        cells.append(_fmt(row.published_average, percent))
    return cells


# What the cost columns measure (dropped with the columns on a narrow terminal).
COST_LEGEND = (
    "merge s: the final merge only; select s, candidates: the validation selection of its "
    "options (each candidate merged and scored on validation; a base method's selection "
    "included); merge RSS MiB: the merge's own resident peak above what the process held as "
    "it began (the process's peak is in the CSV and JSON); eval ex/s depends on the machine's "
    "load when the row ran"
)


def _caption(board: Board, percent: bool, costs: bool = True) -> str:
    metrics = sorted(set(board.metrics.values()))
    unit = "%" if percent else "raw values"
    text = (
        f"metric: {', '.join(metrics)} ({unit}); norm. avg: % of individual; 95% CI: paired "
        f"bootstrap over test examples ({RESAMPLES} resamples); rank `k=`: tied (the 95% "
        "interval of the paired difference contains 0)"
    )
    if costs:
        text += f"; {COST_LEGEND}"
    if board.multi_seed:
        text += (
            "; seeds: mean ± sample std (n−1) of the average over zoo seeds (data splits and "
            "fine-tuning), the latest run of each seed; the other columns are the latest run's"
        )
    if board.lineage:
        text += f"; checkpoints: lineage `{board.lineage}` ({LINEAGE_WHY})"
    if board.published_setting:
        source = setting_source(board.published_setting)
        text += f"; published: {source}, setting `{board.published_setting}`"
    return text


def to_markdown(boards: Sequence[Board]) -> str:
    parts = ["# mergebench leaderboard", ""]
    if not boards:
        parts.append("No results stored yet.")
    for board in boards:
        percent = _as_percent(board)
        header = _header(board)
        parts += [f"## {board.title}", "", _caption(board, percent), ""]
        parts.append("| " + " | ".join(header) + " |")
        parts.append("| " + " | ".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + " |")
        for row in board.rows:
            parts.append("| " + " | ".join(_cells(board, row, percent)) + " |")
        parts.append("")
    return "\n".join(parts)


def to_csv(boards: Sequence[Board]) -> str:
    """Long format: one line per (board, row, task), plus an `average` line per row."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    # the columns of old CSVs keep their places; the costs added since follow
    cost_keys = ("merge_seconds", "peak_rss_mib", "artifact_mib", "eval_examples_per_second",
                 "selection_seconds", "selection_candidates", "merge_rss_mib")  # fmt: skip
    # Seed columns (beside the interval) only when some board has a row run under 2+ seeds.
    seeded = any(b.multi_seed for b in boards)
    seed_cols = ["seed_mean", "seed_std", "seeds"] if seeded else []
    writer.writerow(
        ["family", "taskset", "num_tasks", "label", "method", "rank", "tied_with_best",
         "task", "metric", "value", "ci_low", "ci_high", *seed_cols, "normalized", "published",
         "selected", *cost_keys]
    )  # fmt: skip
    for b in boards:
        for r in b.rows:
            ident = [b.family, b.taskset, len(b.tasks), r.label, r.method, _fmt_rank(r),
                     "" if r.tied_with_best is None else r.tied_with_best]  # fmt: skip
            tail = [
                json.dumps(r.selected, sort_keys=True),
                *(_csv(r.cost.get(k), _COST_DIGITS[k]) for k in cost_keys),
            ]
            seeds = " ".join(str(s) for s in r.seeds)
            for t in b.tasks:
                low, high = r.scores_ci.get(t, (None, None))
                spread = [_csv(r.scores_seed_mean.get(t)), _csv(r.scores_seed_std.get(t)), seeds]
                writer.writerow(
                    ident
                    + [t, b.metrics[t], _csv(r.scores[t]), _csv(low), _csv(high),
                       *(spread if seeded else []),
                       _csv(r.normalized[t]), _csv(r.published_scores.get(t)), *tail]
                )  # fmt: skip
            low, high = r.average_ci or (None, None)
            spread = [_csv(r.seed_mean), _csv(r.seed_std), seeds]
            writer.writerow(
                ident
                + ["average", "", _csv(r.average), _csv(low), _csv(high),
                   *(spread if seeded else []),
                   _csv(r.normalized_average), _csv(r.published_average), *tail]
            )  # fmt: skip
    return buf.getvalue()


def _csv(value: float | None, digits: int = 3) -> str:
    """A CSV number at the board's precision (scores: 0.1 points of a percentage, or three
    decimals of a raw value; costs as their columns show them), not float noise."""
    return "" if value is None else f"{value:.{digits}f}"


_COST_DIGITS = {key: digits for _, key, digits in COSTS} | {"peak_rss_mib": 0}


def to_json(boards: Sequence[Board]) -> dict[str, Any]:
    return {
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "boards": [asdict(b) | {"title": b.title} for b in boards],
    }


_SORT_SCRIPT = """
document.querySelectorAll('table.board th').forEach((th, col) => {
  th.addEventListener('click', () => {
    const body = th.closest('table').tBodies[0];
    const rows = Array.from(body.rows).filter(r => !r.classList.contains('ref'));
    const refs = Array.from(body.rows).filter(r => r.classList.contains('ref'));
    const asc = th.dataset.dir !== 'asc';
    th.closest('tr').querySelectorAll('th').forEach(h => delete h.dataset.dir);
    th.dataset.dir = asc ? 'asc' : 'desc';
    const key = r => {
      const c = r.cells[col];
      const v = parseFloat(c.dataset.sort ?? c.textContent);
      return isNaN(v) ? c.textContent : v;
    };
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      const d = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
      return asc ? d : -d;
    });
    refs.concat(rows).forEach(r => body.appendChild(r));
  });
});
"""

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin-bottom:1em}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}"
    "th{cursor:pointer;background:#f3f3f3}th[data-dir=asc]::after{content:' \\25B2'}"
    "th[data-dir=desc]::after{content:' \\25BC'}"
    "td:nth-child(2),th:nth-child(2){text-align:left}tr.ref td{font-style:italic;color:#666}"
    "td.sel{text-align:left;white-space:normal;max-width:16em;font-size:85%}"
    "small{color:#777}.cap{color:#555;max-width:70em}.plots img{max-width:48%;margin:4px}"
)


def _shade(value: float | None, low: float, high: float) -> str:
    """Background of a normalized score on the board's own range (not on 0-100)."""
    if value is None or high <= low:
        return ""
    alpha = 0.08 + 0.6 * max(0.0, min(1.0, (value - low) / (high - low)))
    return f" style='background: rgba(46, 139, 87, {alpha:.2f})'"


def _html_code(text: str) -> str:
    """Escaped text whose `backticked` parts become <code> (captions are written for
    Markdown; HTML showed the backticks literally)."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _plot_images(board: Board, plot_dir: Path | None) -> list[str]:
    if plot_dir is None or not plot_dir.is_dir():
        return []
    images = []
    for png in sorted(plot_dir.glob(f"{plot_stem(board)}_*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        images.append(f"<img alt='{html.escape(png.name)}' src='data:image/png;base64,{data}'>")
    return images


def to_html(boards: Sequence[Board], plot_dir: str | os.PathLike[str] | None = None) -> str:
    """A self-contained page: per board a sortable table (click a header) of per-task scores
    with their 95% intervals, shaded by normalized score on the board's own range, the
    average, cost and selected values; on a board with a row run under 2+ seeds, a seeds
    column (sorting by the mean) and the per-task spread under each score; the board's
    plots embedded below it."""
    esc = html.escape
    folder = Path(plot_dir) if plot_dir else None
    body = []
    for board in boards:
        percent = _as_percent(board)
        body.append(
            f"<h2>{esc(board.title)}</h2><p class='cap'>{_html_code(_caption(board, percent))}</p>"
        )
        seeded = board.multi_seed
        header = ["rank", "method", *board.tasks, "avg", *([SEEDS_COLUMN] if seeded else []),
                  "norm. avg", "tied with best", "selected", *COST_COLUMNS]  # fmt: skip
        body.append("<table class='board'><thead><tr>")
        body += [f"<th>{esc(c)}</th>" for c in header]
        body.append("</tr></thead><tbody>")
        normalized = [
            v
            for r in board.rows
            if not r.is_reference
            for v in r.normalized.values()
            if v is not None
        ]
        low, high = (min(normalized), max(normalized)) if normalized else (0.0, 1.0)
        for row in board.rows:
            body.append("<tr class='ref'>" if row.is_reference else "<tr>")
            rank = row.rank_label or (str(row.rank) if row.rank else "")
            body.append(f"<td data-sort='{esc(rank.rstrip('='))}'>{esc(rank or '—')}</td>")
            body.append(f"<td>{esc(row.label)}</td>")
            for task in board.tasks:
                value, ci = row.scores[task], row.scores_ci.get(task)
                sub = f"<br><small>{esc(_fmt_ci(ci, percent))}</small>" if ci else ""
                if seeded and row.seeds:
                    spread = _fmt_seeds(
                        row.scores_seed_mean.get(task),
                        row.scores_seed_std.get(task),
                        len(row.seeds),
                        percent,
                    )
                    sub += f"<br><small>seeds {esc(spread)}</small>"
                norm = row.normalized[task]
                title = f" title='{100 * norm:.1f}% of individual'" if norm is not None else ""
                body.append(
                    f"<td data-sort='{value if value is not None else ''}'"
                    f"{_shade(norm, low, high)}{title}>{esc(_fmt(value, percent))}{sub}</td>"
                )
            sub = (
                f"<br><small>{esc(_fmt_ci(row.average_ci, percent))}</small>"
                if row.average_ci
                else ""
            )
            body.append(f"<td data-sort='{row.average if row.average is not None else ''}'>"
                        f"<b>{esc(_fmt(row.average, percent))}</b>{sub}</td>")  # fmt: skip
            if seeded:
                mean = "" if row.seed_mean is None else row.seed_mean
                body.append(f"<td data-sort='{mean}'>{esc(_fmt_row_seeds(row, percent))}</td>")
            body.append(f"<td>{esc(_fmt(row.normalized_average, True))}</td>")
            tied = "" if row.tied_with_best is None else ("yes" if row.tied_with_best else "no")
            body.append(f"<td>{tied}</td><td class='sel'>{esc(_selected_text(row))}</td>")
            for _, key, digits in COSTS:
                body.append(f"<td>{esc(_fmt_cost(row.cost.get(key), digits))}</td>")
            body.append("</tr>")
        body.append("</tbody></table>")
        images = _plot_images(board, folder)
        if images:
            body.append("<div class='plots'>" + "".join(images) + "</div>")
    if not boards:
        body.append("<p>No results stored yet.</p>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>mergebench leaderboard</title>"
        f"<style>{_STYLE}</style></head><body><h1>mergebench leaderboard</h1>"
        + "".join(body)
        + f"<script>{_SORT_SCRIPT}</script></body></html>\n"
    )


def print_boards(boards: Sequence[Board], file: Any = None) -> None:
    """A terminal table per board (rich)."""
    from rich.console import Console
    from rich.table import Table

    tables = []
    for board in boards:
        percent = _as_percent(board)
        header = _header(board)
        tables.append((board, percent, header, [_cells(board, r, percent) for r in board.rows]))
    console = Console(file=file)
    if not console.is_terminal:  # files and pipes: wide enough that every column fits
        needed = (_width(h, rows, range(len(h))) for _, _, h, rows in tables)
        console = Console(file=file, width=max([100, *needed]))
    if not boards:
        console.print("No results stored yet.")
    for board, percent, header, rows in tables:
        caption = _caption(board, percent)
        keep = list(range(len(header)))
        if _width(header, rows, keep) > console.width:  # a narrow terminal: costs go first
            keep = [i for i, col in enumerate(header) if col not in COST_COLUMNS]
            caption = _caption(board, percent, costs=False)
            caption += "; cost columns hidden (terminal too narrow: --format markdown shows them)"
        table = Table(title=board.title, caption=caption)
        for i in keep:
            col = header[i]
            # the seeds cell (`73.0 ± 3.6 (3 seeds)`) reads badly wrapped: keep it on one
            # line; every other cell wraps rather than being cut to `…`
            table.add_column(
                col,
                justify="left" if i == 1 else "right",
                no_wrap=col == SEEDS_COLUMN,
                overflow="fold",
            )
        for row, cells in zip(board.rows, rows, strict=True):
            table.add_row(
                *(cells[i] for i in keep), style="italic dim" if row.is_reference else None
            )
        console.print(table)


def _width(header: Sequence[str], rows: Sequence[Sequence[str]], keep: Sequence[int]) -> int:
    """Characters a rich table of these columns needs on one line (3 per column border)."""
    return sum(max(len(header[i]), *(len(r[i]) for r in rows)) + 3 for i in keep) + 1


def _terminal_text(boards: Sequence[Board], plot_dir: Any = None) -> str:
    buf = io.StringIO()
    print_boards(boards, file=buf)
    return buf.getvalue()


@dataclass(frozen=True)
class Format:
    """A leaderboard format: its file suffix and how boards become text."""

    suffix: str
    render: Callable[[Sequence[Board], str | os.PathLike[str] | None], str]


# The one table of formats: `--format`'s choices, `write_leaderboard`'s suffixes, `render`.
FORMATS: dict[str, Format] = {
    "table": Format(".txt", _terminal_text),
    "markdown": Format(".md", lambda boards, plots: to_markdown(boards)),
    "csv": Format(".csv", lambda boards, plots: to_csv(boards)),
    "json": Format(".json", lambda boards, plots: json.dumps(to_json(boards), indent=2) + "\n"),
    "html": Format(".html", to_html),
}


def render(
    boards: Sequence[Board], fmt: str, plot_dir: str | os.PathLike[str] | None = None
) -> str:
    if fmt not in FORMATS:
        raise MergeBenchError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt].render(boards, plot_dir)


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    atomic_write_text(path, text)


def write_leaderboard(
    db: str | os.PathLike[str] = DEFAULT_DB,
    out_dir: str | os.PathLike[str] = "outputs",
    formats: Sequence[str] = ("markdown", "json"),
    family: str | None = None,
    taskset: str | None = None,
    stem: str = "leaderboard",
    plot_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Write `<out_dir>/leaderboard.{md,json,...}` from the store; returns format -> path."""
    boards = load_boards(db, family=family, taskset=taskset)
    written = {}
    for fmt in formats:
        text = render(boards, fmt, plot_dir)  # an unknown format fails here, in one line
        path = Path(out_dir) / f"{stem}{FORMATS[fmt].suffix}"
        atomic_write(path, text)
        written[fmt] = path
    return written
