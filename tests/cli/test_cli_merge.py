"""The `mergebench-merge` Hydra CLI, run as a user would (subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergebench
from mergebench.cli.merge import main as merge_main

SCRIPT = Path(sys.executable).parent / "mergebench-merge"


@pytest.fixture
def checkpoints(tmp_path, tiny_models):
    pre, finetuned = tiny_models
    save_file(pre, tmp_path / "pre.safetensors")
    for task, state in finetuned.items():
        save_file(state, tmp_path / f"{task}.safetensors")
    return tmp_path, pre, finetuned


def run_cli(cwd, *args):
    """The installed console script, in a fresh process, exactly as a user runs it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@dataclass
class Outcome:
    returncode: int
    stderr: str


def run_in_process(cwd, capsys, monkeypatch, *args) -> Outcome:
    """The same entry point in this process (importing torch per case would cost seconds)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["mergebench-merge", *args])
    code = 0
    try:
        merge_main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return Outcome(code, capsys.readouterr().err)


FINETUNED = "finetuned={a: a.safetensors, b: b.safetensors, c: c.safetensors}"
EXCLUDE = r"exclude=[classifier\..*]"


def test_readme_example_merges_and_saves(checkpoints):
    cwd, pre, finetuned = checkpoints
    proc = run_cli(
        cwd,
        "method=emr",
        "pretrained=pre.safetensors",
        FINETUNED,
        EXCLUDE,
        "output_dir=out",
        "method.rescale=false",
    )
    assert proc.returncode == 0, proc.stderr
    loaded = mergebench.load_result(cwd / "out")
    assert loaded.params["rescale"] is False
    expected = mergebench.merge(
        "emr", pre, finetuned, exclude=[r"classifier\..*"], rescale=False, progress=False
    )
    for key, value in expected.state_dict("b").items():
        assert torch.equal(loaded.state_dict("b")[key], value), key


def test_nested_base_parameters(checkpoints, capsys, monkeypatch):
    cwd, pre, finetuned = checkpoints
    proc = run_in_process(
        cwd,
        capsys,
        monkeypatch,
        "method=dare",
        "method.base=ties",
        "method.base_params={k: 0.5}",
        "pretrained=pre.safetensors",
        FINETUNED,
        EXCLUDE,
        "output_dir=out",
    )
    assert proc.returncode == 0, proc.stderr
    assert mergebench.load_result(cwd / "out").params["base_params"] == {"k": 0.5}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["method=nope"], "nope"),
        (["method.bogus=1"], "bogus"),
        (["+method.bogus=1"], "unknown option 'bogus'"),
        (["method.k=2.0", "method=ties"], "ties.k"),
        (["finetuned={a: a.safetensors, b: broken.safetensors}"], "broken.safetensors"),
    ],
)
def test_bad_input_exits_2_with_the_culprit_named(checkpoints, capsys, monkeypatch, args, needle):
    cwd, _, _ = checkpoints
    (cwd / "broken.safetensors").write_bytes(b"garbage")
    base = {"pretrained": "pretrained=pre.safetensors", "finetuned": FINETUNED}
    for arg in args:
        base.pop(arg.split("=")[0], None)
    proc = run_in_process(
        cwd, capsys, monkeypatch, *base.values(), EXCLUDE, "output_dir=out", *args
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert not (cwd / "out").exists()


def test_missing_required_value_exits_2(checkpoints, capsys, monkeypatch):
    cwd, _, _ = checkpoints
    proc = run_in_process(cwd, capsys, monkeypatch, "pretrained=pre.safetensors", FINETUNED)
    assert proc.returncode == 2
    assert "output_dir: missing value" in proc.stderr


def test_console_script_exits_2_on_an_unknown_method(checkpoints):
    cwd, _, _ = checkpoints
    proc = run_cli(cwd, "method=nope", "pretrained=pre.safetensors", FINETUNED, "output_dir=out")
    assert proc.returncode == 2
    assert "nope" in proc.stderr
    assert not (cwd / "out").exists()


def test_help_lists_only_what_the_command_reads(tmp_path):
    # Before: Hydra's default help listed experiment, model, taskset, variant, logger: groups
    # of `mergebench` that `mergebench-merge` never reads.
    done = subprocess.run(
        [sys.executable, "-m", "mergebench.cli.merge", "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "== Methods ==" in done.stdout and "emr, fisher" in done.stdout
    for group in ("experiment:", "taskset:", "variant:", "logger:"):
        assert group not in done.stdout
    assert "output_dir: ???" in done.stdout and not (tmp_path / "outputs").exists()
