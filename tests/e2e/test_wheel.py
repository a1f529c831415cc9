"""The built wheel works without the source tree: config as package data, entry points.

The wheel is built from this checkout, installed with `pip --target` (no dependencies: the
ones in this venv serve), and used from another folder with only that target on
`sys.path` ahead of the venv, so nothing can come from `src/` or the repository's `conf/`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = (
    "mergebench",
    "mergebench-merge",
    "mergebench-zoo",
    "mergebench-leaderboard",
    "mergebench-experiment",
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    dist = work / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(dist.glob("mergebench-*.whl"))
    target = work / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    return target


def _env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MERGEBENCH_CONF"}
    env["PYTHONPATH"] = str(target)
    return env


def test_wheel_ships_the_config_and_merges_from_another_folder(installed, tmp_path):
    script = f"""
import pathlib, torch, mergebench
from mergebench.methods import method_defaults
from mergebench.util.config import conf_dir
assert pathlib.Path(mergebench.__file__).is_relative_to(pathlib.Path(r'{installed}')), mergebench.__file__
assert conf_dir().is_relative_to(pathlib.Path(r'{installed}')), conf_dir()
assert method_defaults('ties') == {{'k': 0.2, 'scaling': 0.3, 'aggregate': 'sum', 'topk_scope': 'global'}}
pre = {{'w': torch.zeros(4)}}
ft = {{'a': {{'w': torch.tensor([1., -1., 2., 0.])}}, 'b': {{'w': torch.tensor([1., 1., -2., 0.])}}}}
r = mergebench.merge('emr', pre, ft, progress=False)
r.save('out')
back = mergebench.load_result('out')
assert torch.equal(back.state_dict('a')['w'], r.state_dict('a')['w'])
print('ok')
"""
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=_env(installed),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


def test_wheel_ships_every_data_file_and_its_loaders_read_them(installed, tmp_path):
    # Every file of the package that is not Python (configs, lookup tables) is in the wheel:
    # a table left out of [tool.setuptools.package-data] fails here, not on a user's machine.
    package = ROOT / "src" / "mergebench"
    data = {
        f.relative_to(package)
        for f in package.rglob("*")
        if f.is_file() and f.suffix not in (".py", ".pyc") and "__pycache__" not in f.parts
    }
    assert {Path("families/clip_prompts.json"), Path("report/published.json")} <= data
    missing = sorted(str(f) for f in data if not (installed / "mergebench" / f).is_file())
    assert missing == [], f"not in the wheel: {missing}"
    script = f"""
import pathlib, mergebench
from mergebench.families.clip_prompts import PROMPTS
from mergebench.report.published import SETTINGS, find_setting
assert pathlib.Path(mergebench.__file__).is_relative_to(pathlib.Path(r'{installed}'))
assert len(PROMPTS['sun397'].classnames) == 397 and PROMPTS['mnist'].templates
assert find_setting('openclip_vit_b32', 'clip8').average['emr'] == 88.7
print('ok')
"""
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=_env(installed),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_answers_help(installed, tmp_path, script):
    executable = installed / "bin" / script
    assert executable.is_file(), f"{script} was not installed"
    run = subprocess.run(
        [sys.executable, str(executable), "--help"], cwd=tmp_path, env=_env(installed),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "usage" in (run.stdout + run.stderr).lower() or "== Config ==" in run.stdout
