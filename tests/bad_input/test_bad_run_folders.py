"""Hydra's run folder (issue 26): a refused command leaves none behind, and a working folder
where Hydra cannot create one is one line, not a traceback."""

from __future__ import annotations

import sys

from bad_input.conftest import BASE, assert_one_line_error


def test_refused_merge_leaves_no_run_folder(work, merge_cli):
    # Before: outputs/merge/<time>/ (.hydra/ and merge.log) stayed although nothing was merged.
    outcome = merge_cli("method=ties", "pretrained=nope.safetensors", *BASE[1:], "output_dir=out")
    assert_one_line_error(outcome, "nope.safetensors")
    assert not (work / "outputs").exists()


def test_refused_merge_keeps_an_existing_outputs_folder(work, merge_cli):
    (work / "outputs" / "merge" / "earlier").mkdir(parents=True)
    (work / "outputs" / "merge" / "earlier" / "merge.log").write_text("an earlier run")
    (work / "outputs" / "mine.txt").write_text("keep")
    outcome = merge_cli("method=ties", "method.k=2", *BASE, "output_dir=out")
    assert_one_line_error(outcome, "ties.k")
    assert sorted(p.name for p in (work / "outputs").iterdir()) == ["merge", "mine.txt"]
    assert [p.name for p in (work / "outputs" / "merge").iterdir()] == ["earlier"]


def test_successful_merge_keeps_its_run_folder(work, merge_cli):
    outcome = merge_cli("method=ties", *BASE, "output_dir=out", changes=True)
    assert outcome.code == 0, outcome.stderr
    (run,) = (work / "outputs" / "merge").iterdir()
    assert (run / ".hydra" / "config.yaml").is_file()


def test_run_folder_that_cannot_be_created(work, merge_cli):
    # As root a read-only folder is writable, so a file in the way stands in for it: Hydra's
    # mkdir fails the same way (it raised a traceback before).
    outcome = merge_cli(*BASE, "output_dir=out", "hydra.run.dir=NOTES.md/run")
    line = assert_one_line_error(outcome, "NOTES.md", "cannot create the run folder")
    assert "hydra.run.dir=" in line


def test_bench_run_folder_that_cannot_be_created(work, capsys, monkeypatch):
    from bad_input.conftest import Outcome
    from mergebench.cli.bench import main as bench_main

    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["mergebench", "hydra.run.dir=NOTES.md/run"])
    try:
        bench_main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    outcome = Outcome(code, capsys.readouterr().err)
    assert_one_line_error(outcome, "NOTES.md", "cannot create the run folder")
