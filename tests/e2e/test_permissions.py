"""Saved files follow the umask (colleagues on shared storage can read them), whatever
temporary files the atomic writes go through."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import mergebench
from mergebench.sources.zoo import save_atomic, write_manifest
from mergebench.util.fs import atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("method", ["task_arithmetic", "emr"])
def test_saved_results_are_readable_by_others(tmp_path, umask_022, method):
    pre = {"w": torch.zeros(4)}
    finetuned = {"a": {"w": torch.ones(4)}, "b": {"w": -torch.ones(4)}}
    out = mergebench.merge(method, pre, finetuned, progress=False).save(tmp_path / "out")
    assert _mode(out) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(_mode(p) == 0o644 for p in files), {p.name: oct(_mode(p)) for p in files}


def test_zoo_files_and_reports_are_readable_by_others(tmp_path, umask_022):
    save_atomic({"w": torch.zeros(2)}, tmp_path / "zoo" / "a.safetensors")
    write_manifest(tmp_path / "zoo", {"tasks": {}})
    atomic_write_text(tmp_path / "board.md", "# board\n")
    for path in (tmp_path / "zoo" / "a.safetensors", tmp_path / "zoo" / "zoo.json",
                 tmp_path / "board.md"):  # fmt: skip
        assert _mode(path) == 0o644, path


def test_a_stricter_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private.txt") == 0o600
