"""The bad-input catalogue: every mistake a user can make gives exit code 2 (or a
`MergeBenchError`), one line naming the culprit, no traceback, and nothing of theirs lost."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergebench.cli.merge import main as merge_main

FINETUNED = "finetuned={a: a.safetensors, b: b.safetensors, c: c.safetensors}"
EXCLUDE = r"exclude=[classifier\..*]"
HEAD = [r"classifier\..*"]


def tiny_models(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    pre = {
        "layer.weight": torch.randn(6, 5, generator=g),
        "layer.bias": torch.randn(6, generator=g),
        "classifier.weight": torch.randn(3, 4, generator=g),
    }
    finetuned = {}
    for index, task in enumerate("abc"):
        ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        ft["classifier.weight"] = torch.randn(2 + index, 4, generator=g)
        finetuned[task] = ft
    return pre, finetuned


@pytest.fixture
def models():
    return tiny_models()


@pytest.fixture
def work(tmp_path, models, monkeypatch):
    """A user's folder: checkpoints and a notes file; the cache points inside it."""
    pre, finetuned = models
    save_file(pre, tmp_path / "pre.safetensors")
    for task, state in finetuned.items():
        save_file(state, tmp_path / f"{task}.safetensors")
    (tmp_path / "NOTES.md").write_text("my notes\n")
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path


def tree_hash(root: Path, skip: tuple[str, ...] = ("outputs",)) -> dict[str, str]:
    """Every file under `root` (but Hydra's run logs, and the pretrained digests a merge
    remembers in the cache the fixture points inside: `util.hashing.remembered_digest`)
    with its sha256."""
    out = {}
    digests = root / "cache" / "digests"
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) == root and d in skip)]
        if Path(dirpath) == digests:
            continue
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_file():  # a FIFO would block the reader
                out[str(path.relative_to(root))] = "not a file"
                continue
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    code: int
    stderr: str


def assert_one_line_error(outcome: Outcome, *culprits: str, code: int = 2) -> str:
    assert outcome.code == code, outcome.stderr
    assert "Traceback" not in outcome.stderr, outcome.stderr
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, outcome.stderr
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    record(lines[0])
    return lines[0]


def record(message: str) -> None:
    """With MERGEBENCH_CATALOGUE=<file>, append each message shown (for docs/reliability.md)."""
    target = os.environ.get("MERGEBENCH_CATALOGUE")
    if target:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(target, "a") as handle:
            handle.write(f"{test}\t{message}\n")


@pytest.fixture
def merge_cli(work, capsys, monkeypatch):
    """`mergebench-merge ARGS` in this process (a subprocess per case would cost seconds):
    the user's folder must be unchanged unless `changes=True`."""

    def run(*args: str, changes: bool = False) -> Outcome:
        monkeypatch.chdir(work)
        monkeypatch.setattr(sys, "argv", ["mergebench-merge", "progress=false", *args])
        before = tree_hash(work)
        capsys.readouterr()
        code = 0
        try:
            merge_main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        outcome = Outcome(code, capsys.readouterr().err)
        if not changes:
            assert tree_hash(work) == before, outcome.stderr
        return outcome

    return run


BASE = ("pretrained=pre.safetensors", FINETUNED, EXCLUDE)
