"""The issue's done-when command, from the command line (the `mergebench` Hydra app in
this process): tiny Llama experts merged by EMR and scored on two local lm-eval tasks land
on a board with bootstrap intervals, beside the reference rows."""

from __future__ import annotations

import sys

import pytest
from tiny_llm import GEN_TASK, MC_TASK, llm_pool, lm_eval_tasks

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[llm]')")

from mergebench.report.boards import load_boards  # noqa: E402


@pytest.fixture
def bench(tmp_path, capsys, monkeypatch):
    base, experts = llm_pool(tmp_path / "pool", "llama")
    include = lm_eval_tasks(tmp_path / "tasks")
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    common = [
        "model=causal_lm", f"model.checkpoints.pretrained={base}",
        f"model.checkpoints.finetuned={{a: {experts['a']}, b: {experts['b']}}}",
        "taskset=lm_eval", f"taskset.tasks=[{MC_TASK},{GEN_TASK}]",
        f"taskset.expert_tasks={{a: {MC_TASK}, b: {GEN_TASK}}}",
        f"store.path={tmp_path / 'runs.sqlite'}", "progress=false", "eval.lm_eval.batch_size=4",
    ]  # fmt: skip

    def run(*args: str) -> tuple[int, str]:
        from mergebench.cli.bench import main

        monkeypatch.setattr(sys, "argv", ["mergebench", *common, *args])
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        return code, capsys.readouterr().err

    return run, include, tmp_path


def test_done_when_command_lands_a_row_with_intervals(bench):
    run, include, tmp = bench
    code, err = run(f"taskset.include_path={include}", "method=emr")
    assert code == 0, err
    (board,) = load_boards(tmp / "runs.sqlite")
    assert board.tasks == [MC_TASK, GEN_TASK]
    assert board.metrics == {MC_TASK: "acc", GEN_TASK: "exact_match"}
    rows = {row.label: row for row in board.rows}
    assert set(rows) == {"individual", "pretrained", "expert:a", "expert:b", "emr"}
    assert [r.label for r in board.rows if not r.is_reference] == ["emr"]
    emr = rows["emr"]
    assert emr.rank_label == "1" and emr.average_ci is not None
    low, high = emr.average_ci
    assert low <= emr.average <= high
    assert set(emr.scores_ci) == {MC_TASK, GEN_TASK}
    assert rows["individual"].scores[MC_TASK] == rows["expert:a"].scores[MC_TASK]
    assert rows["individual"].scores[GEN_TASK] == rows["expert:b"].scores[GEN_TASK]


def test_missing_include_path_is_one_line_naming_it(bench):
    run, _, tmp = bench
    code, err = run(f"taskset.include_path={tmp / 'nowhere'}", "method=emr")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "taskset.include_path" in lines[0] and "no such folder" in lines[0]
