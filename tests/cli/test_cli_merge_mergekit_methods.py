"""`mergebench-merge` runs `slerp` and `model_stock` on safetensors checkpoints: the saved
artifact equals `mergebench.merge(...)` on the same files; a wrong task count or option
exits 2 with one line naming it."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

import mergebench
from mergebench.cli.merge import main as merge_main

HEAD = r"classifier\..*"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    g = torch.Generator().manual_seed(3)
    pre = {
        "blocks.0.attn.weight": torch.randn(8, 6, generator=g),
        "blocks.0.attn.bias": torch.randn(8, generator=g),
        "embed.weight": torch.randn(10, 6, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(5),
    }
    save_file(pre, folder / "pre.safetensors")
    for index, task in enumerate("abc"):
        ft = {
            k: (v.float() + 0.3 * torch.randn(v.shape, generator=g)).to(v.dtype)
            for k, v in pre.items()
            if v.is_floating_point()
        }
        ft["position_ids"] = pre["position_ids"].clone()
        ft["classifier.weight"] = torch.randn(2 + index, 6, generator=g)
        save_file(ft, folder / f"{task}.safetensors")
    return folder


def run_cli(cwd, monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["mergebench-merge", *args])
    code = 0
    try:
        merge_main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def finetuned_arg(pool, tasks: str) -> str:
    return "finetuned={" + ", ".join(f"{t}: {pool}/{t}.safetensors" for t in tasks) + "}"


@pytest.mark.parametrize(
    ("method", "tasks", "overrides", "options"),
    [
        ("slerp", "ab", ["method.t=0.3", "method.endpoints=[b,a]"], {"t": 0.3, "endpoints": ["b", "a"]}),
        ("model_stock", "abc", ["method.filter_wise=true"], {"filter_wise": True}),
    ],
)  # fmt: skip
def test_cli_merge_equals_the_api(method, tasks, overrides, options, pool, tmp_path,
                                  monkeypatch, capsys):  # fmt: skip
    out = tmp_path / "out"
    code, err = run_cli(
        tmp_path, monkeypatch, capsys, f"method={method}", f"pretrained={pool}/pre.safetensors",
        finetuned_arg(pool, tasks), f"exclude=[{HEAD}]", f"output_dir={out}", "progress=false",
        *overrides,
    )  # fmt: skip
    assert code == 0, err
    loaded = mergebench.load_result(out)
    expected = mergebench.merge(
        method, pool / "pre.safetensors", {t: pool / f"{t}.safetensors" for t in tasks},
        exclude=[HEAD], progress=False, **options,
    )  # fmt: skip
    assert loaded.method == method and loaded.params == expected.params
    assert list(loaded.tasks) == list(tasks)
    for task in tasks:
        got, want = loaded.state_dict(task), expected.state_dict(task)
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key].dtype == value.dtype, (task, key)
            assert torch.equal(got[key], value), (task, key)


@pytest.mark.parametrize(
    ("method", "tasks", "overrides", "needle"),
    [
        ("slerp", "abc", [], "slerp: merges exactly two fine-tuned models, got 3 tasks (a, b, c)"),
        ("slerp", "ab", ["method.t=nan"], "slerp.t: "),
        ("slerp", "ab", ["method.endpoints=[a,z]"], "slerp.endpoints: 'z' is not a task"),
        ("model_stock", "a", [], "model_stock: needs at least two fine-tuned models, got 1"),
        ("model_stock", "ab", ["method.filter_wise=maybe"], "model_stock.filter_wise: "),
    ],
)
def test_bad_input_exits_2_with_one_line(method, tasks, overrides, needle, pool, tmp_path,
                                         monkeypatch, capsys):  # fmt: skip
    code, err = run_cli(
        tmp_path, monkeypatch, capsys, f"method={method}", f"pretrained={pool}/pre.safetensors",
        finetuned_arg(pool, tasks), f"exclude=[{HEAD}]", f"output_dir={tmp_path / 'out'}",
        "progress=false", *overrides,
    )  # fmt: skip
    assert code == 2, err
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
