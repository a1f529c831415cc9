"""`mergebench-convert`: task_vectors' pickled modules become safetensors only with
--trust-pickle; plain state dicts convert without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tiny_openclip as tiny
import tomllib
import torch
from safetensors.torch import load_file

from mergebench.cli import convert


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    model = tiny.open_clip_model(tiny.write_arch_config(root / "arch"), seed=3)
    pickled = tiny.save_image_encoder_pickle(model, root / "finetuned.pt")
    return {"root": root, "model": model, "pickled": pickled}


def run_main(args: list[str]) -> int:
    try:
        convert.main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_pickled_module_is_refused_without_the_flag(clip, tmp_path, capsys):
    target = tmp_path / "out.safetensors"
    assert run_main([str(clip["pickled"]), str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("mergebench-convert: error:")
    assert "--trust-pickle" in err and "run code" in err
    assert not target.exists()


def test_trusted_pickle_gives_open_clip_keys(clip, tmp_path, capsys):
    target = tmp_path / "out.safetensors"
    assert run_main(["--trust-pickle", str(clip["pickled"]), str(target)]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "runs code" in captured.err
    assert "wrote" in captured.out
    state = load_file(str(target))
    # create_model's names without the ImageEncoder's `model.`; the text transformer was deleted.
    expected = {
        k: v for k, v in clip["model"].state_dict().items() if not k.startswith("transformer.")
    }
    assert set(state) == set(expected)
    assert "visual.conv1.weight" in state and "logit_scale" in state
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value)
    # --strip-prefix '' keeps the wrapper's names.
    kept = tmp_path / "kept.safetensors"
    assert run_main(["--trust-pickle", "--strip-prefix", "", str(clip["pickled"]), str(kept)]) == 0
    assert all(k.startswith("model.") for k in load_file(str(kept)))


def test_plain_state_dict_needs_no_flag(clip, tmp_path, capsys):
    source = tmp_path / "state.pt"
    torch.save({f"model.{k}": v for k, v in clip["model"].state_dict().items()}, source)
    target = tmp_path / "state.safetensors"
    assert run_main([str(source), str(target)]) == 0
    assert "warning" not in capsys.readouterr().err
    state = load_file(str(target))
    assert set(state) == set(clip["model"].state_dict())


def test_bad_arguments_fail_in_one_line(clip, tmp_path, capsys):
    assert run_main([str(tmp_path / "missing.pt"), str(tmp_path / "o.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert run_main(["--trust-pickle", str(clip["pickled"]), str(tmp_path / "o.bin")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert run_main(["--trust-pickle", str(junk), str(tmp_path / "o.safetensors")]) == 2
    # Not a pickle at all: refused before any unpickling (no warning), saying what it is.
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergebench-convert: error:")
    assert "is a text file" in lines[0] and "--trust-pickle" not in lines[0]


def test_console_script_is_declared_and_runs(clip, tmp_path):
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["mergebench-convert"] == "mergebench.cli.entry:convert"
    done = subprocess.run(
        [sys.executable, "-m", "mergebench.cli.convert", str(clip["pickled"]),
         str(tmp_path / "o.safetensors")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "--trust-pickle" in done.stderr
    assert "Traceback" not in done.stderr
