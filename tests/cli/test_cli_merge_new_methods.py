"""`mergebench-merge` runs each of the ten 2024-2025 methods (issue 11) on tiny safetensors
checkpoints, with an option of its own set on the command line: the saved artifact loads
and equals `mergebench.merge(...)` on the same files with the same options, for every task.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergebench
from mergebench.cli.merge import main as merge_main

TASKS = ("a", "b", "c")
HEAD = r"classifier\..*"
PATTERN = r"blocks\.(\d+)\."

# method -> (command-line overrides, the same options as Python values)
CASES = {
    "breadcrumbs": (["method.density=0.5", "method.outlier=0.1"], {"density": 0.5, "outlier": 0.1}),
    "della": (["method.density=0.6", "method.seed=3"], {"density": 0.6, "seed": 3}),
    "tall_masks": (
        ["method.threshold=0.4", "method.base=ties"],
        {"threshold": 0.4, "base": "ties"},
    ),
    "consensus": (["method.k=1", "method.scaling=0.5"], {"k": 1, "scaling": 0.5}),
    "tsv": (["method.scaling=0.75"], {"scaling": 0.75}),
    "iso_c": (["method.scaling=1.5"], {"scaling": 1.5}),
    "iso_cts": (["method.common_fraction=0.5"], {"common_fraction": 0.5}),
    "cart": (["method.rank_ratio=0.5", "method.scaling=1.5"], {"rank_ratio": 0.5, "scaling": 1.5}),
    "lines": (
        [f"method.layer_pattern='{PATTERN}'", "method.beta=0.8"],
        {"layer_pattern": PATTERN, "beta": 0.8},
    ),
    "wudi": (
        ["method.steps=5", "method.lr=0.001", "method.others=mean"],
        {"steps": 5, "lr": 0.001, "others": "mean"},
    ),
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Two blocks of matrices and biases, an embedding, an integer buffer, per-task heads."""
    folder = tmp_path_factory.mktemp("pool")
    g = torch.Generator().manual_seed(11)
    pre = {
        "blocks.0.attn.weight": torch.randn(8, 6, generator=g),
        "blocks.0.attn.bias": torch.randn(8, generator=g),
        "blocks.1.mlp.weight": torch.randn(6, 8, generator=g),
        "blocks.1.mlp.bias": torch.randn(6, generator=g),
        "embed.weight": torch.randn(10, 6, generator=g),
        "position_ids": torch.arange(5),
    }
    save_file(pre, folder / "pre.safetensors")
    for index, task in enumerate(TASKS):
        ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        ft["position_ids"] = pre["position_ids"].clone()
        ft["classifier.weight"] = torch.randn(2 + index, 6, generator=g)  # own head size
        save_file(ft, folder / f"{task}.safetensors")
    return folder


def run_cli(cwd, monkeypatch, capsys, *args) -> tuple[int, str]:
    """The console script's entry point in this process (as tests/cli/test_cli_merge.py does)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["mergebench-merge", *args])
    code = 0
    try:
        merge_main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def test_the_cases_are_the_ten_new_methods():
    script = Path(__file__).resolve().parents[2] / "scripts" / "run_bench.py"
    spec = importlib.util.spec_from_file_location("run_bench", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(CASES) == module.NEW_METHOD_VARIANTS


@pytest.mark.parametrize("method", list(CASES))
def test_cli_merge_equals_the_api(method, pool, tmp_path, monkeypatch, capsys):
    overrides, options = CASES[method]
    out = tmp_path / "out"
    finetuned = "finetuned={" + ", ".join(f"{t}: {pool}/{t}.safetensors" for t in TASKS) + "}"
    code, err = run_cli(
        tmp_path,
        monkeypatch,
        capsys,
        f"method={method}",
        f"pretrained={pool}/pre.safetensors",
        finetuned,
        f"exclude=[{HEAD}]",
        f"output_dir={out}",
        "progress=false",
        *overrides,
    )
    assert code == 0, err

    loaded = mergebench.load_result(out)
    expected = mergebench.merge(
        method,
        pool / "pre.safetensors",
        {t: pool / f"{t}.safetensors" for t in TASKS},
        exclude=[HEAD],
        progress=False,
        **options,
    )
    assert loaded.method == expected.method == method
    assert loaded.params == expected.params
    for name, value in options.items():
        assert loaded.params[name] == value, name
    assert list(loaded.tasks) == list(TASKS)
    for task in TASKS:
        got, want = loaded.state_dict(task), expected.state_dict(task)
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key].dtype == value.dtype, (task, key)
            assert torch.equal(got[key], value), (task, key)
        assert got["classifier.weight"].shape[0] == 2 + TASKS.index(task)  # its own head
    # The merge did something: some merged matrix is neither the pretrained one nor a task's.
    got = loaded.state_dict("a")["blocks.0.attn.weight"]
    assert not torch.equal(got, load_file(pool / "pre.safetensors")["blocks.0.attn.weight"])
