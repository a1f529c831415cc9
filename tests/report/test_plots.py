"""PNG plots from leaderboard boards (built from plain score rows, no database)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from PIL import Image

from mergebench.report.boards import build_boards
from mergebench.report.plots import (
    ablation_rows,
    mask_rescale_pairs,
    num_tasks_series,
    plot_emr_ablation,
    plot_heatmap,
    plot_num_tasks,
    plot_task_bars,
    write_all_plots,
)

TASKS = ["sun397", "cars", "resisc45", "eurosat"]


def score_rows(runs):
    """`SQLiteStore.scores()`-shaped rows: runs = [(label, method, tasks, values)]."""
    rows = []
    for run_id, (label, method, tasks, values) in enumerate(runs, start=1):
        for pos, (task, value) in enumerate(zip(tasks, values, strict=True)):
            rows.append(
                dict(run_id=run_id, method=method, label=label, family="clip-vit-b32",
                     taskset="vision8", task=task, metric="accuracy", value=value,
                     position=pos)
            )  # fmt: skip
    return rows


@pytest.fixture
def boards():
    runs = [
        ("individual", "individual", TASKS, [0.9, 0.8, 0.95, 0.99]),
        ("task_arithmetic", "task_arithmetic", TASKS, [0.6, 0.5, 0.7, 0.8]),
        ("ties", "ties", TASKS, [0.65, 0.5, 0.75, 0.8]),
        ("emr", "emr", TASKS, [0.85, 0.7, 0.9, 0.97]),
        ("emr (elect+rescale)", "emr", TASKS, [0.6, 0.5, 0.7, 0.8]),
        ("emr (elect)", "emr", TASKS, [0.55, 0.45, 0.6, 0.7]),
        ("ties w/ M&R", "mask_rescale", TASKS, [0.8, 0.6, 0.85, 0.9]),
        ("emr", "emr", TASKS[:2], [0.9, 0.75]),
        ("ties", "ties", TASKS[:2], [0.7, 0.6]),
        ("emr", "emr", TASKS[:3], [0.88, 0.72, 0.92]),
    ]
    boards = build_boards(score_rows(runs))
    # What the store's runs give the board (attach_run_details): the M&R row's base label.
    boards[0].row("ties w/ M&R").base_label = "ties"
    return boards


def _is_png(path, min_size=(200, 150)) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        # a real drawing: more than a couple of colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 10


def test_bars_and_heatmap(boards, tmp_path) -> None:
    full = boards[0]
    assert len(full.tasks) == 4
    _is_png(plot_task_bars(full, tmp_path / "bars.png"))
    _is_png(plot_heatmap(full, tmp_path / "heat.png"))
    _is_png(plot_heatmap(full, tmp_path / "heat_raw.png", normalized=False))


def test_ablation_in_table8_order_and_mr_paired_by_base_label(boards, tmp_path) -> None:
    # Table 8's order (Elect, E+M, E+R, EMR), whatever the scores; E+M is missing here.
    assert [r.label for r in ablation_rows(boards[0])] == [
        "emr (elect)",
        "emr (elect+rescale)",
        "emr",
    ]
    pairs = [(a.label, b.label) for a, b in mask_rescale_pairs(boards[0])]
    assert pairs == [("ties", "ties w/ M&R")]
    _is_png(plot_emr_ablation(boards[0], tmp_path / "abl.png"))


def test_num_tasks_series_and_plot(boards, tmp_path) -> None:
    series = num_tasks_series(boards, "clip-vit-b32")
    # Normalized by each task's individual score: subsets of tasks compare fairly.
    assert series["emr"] == [
        (2, pytest.approx((0.9 / 0.9 + 0.75 / 0.8) / 2)),
        (3, pytest.approx((0.88 / 0.9 + 0.72 / 0.8 + 0.92 / 0.95) / 3)),
        (4, pytest.approx((0.85 / 0.9 + 0.7 / 0.8 + 0.9 / 0.95 + 0.97 / 0.99) / 4)),
    ]
    assert [n for n, _ in series["ties"]] == [2, 4]
    assert "individual" not in series
    _is_png(plot_num_tasks(boards, "clip-vit-b32", tmp_path / "n.png"))
    assert plot_num_tasks(boards, "no-such-family", tmp_path / "none.png") is None


def test_write_all_plots(boards, tmp_path) -> None:
    written = write_all_plots(boards, tmp_path / "plots")
    names = {p.name for p in written}
    assert "clip-vit-b32_vision8_4tasks_heatmap.png" in names
    assert "clip-vit-b32_vision8_4tasks_emr_ablation.png" in names
    assert "clip-vit-b32_num_tasks.png" in names
    assert all(p.exists() for p in written)
    assert not list((tmp_path / "plots").glob(".*"))


def test_no_colour_repeats_and_references_are_grey(boards) -> None:
    from mergebench.report.plots import REFERENCE_GREY, row_colors

    colors = row_colors(boards[0].rows)
    assert len(set(map(str, colors.values()))) == len(colors)
    assert colors["individual"] == REFERENCE_GREY[0]
    # Only reference rows are grey: tab20's grey pair would pass a method off as one.
    methods = [r.label for r in boards[0].rows if not r.is_reference]
    assert all(len(set(colors[m][:3])) > 1 for m in methods)
    many = [replace(boards[0].rows[-1], label=f"m{i}") for i in range(18)]
    assert all(len(set(c[:3])) > 1 for c in row_colors(many).values())
