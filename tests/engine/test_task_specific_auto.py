"""`task_specific: auto` (keyplan.py): in a heterogeneous pool, keys some model lacks or holds
in another shape stay each task's own, and the run records which and why; the default
(`exclude`) keeps refusing such a pool."""

from __future__ import annotations

import sys

import pytest
import torch

import mergebench
from mergebench.util.errors import MergeBenchError

# pretrained = 0 on `w`, so W_t = tau_t there. `pos` is a position table that task b holds
# at another resolution; `extra_norm` is missing in task b; `head` is not in the pretrained
# model and has each task's own shape.
PRE = {
    "w": torch.zeros(3),
    "pos": torch.zeros(4, 2),
    "extra_norm": torch.ones(2),
    "position_ids": torch.arange(4),
}
FT = {
    "a": {
        "w": torch.tensor([1.0, 2.0, -3.0]),
        "pos": torch.full((4, 2), 1.0),
        "extra_norm": torch.full((2,), 2.0),
        "position_ids": torch.arange(4),
        "head": torch.full((2, 3), 5.0),
    },
    "b": {
        "w": torch.tensor([3.0, 0.0, -1.0]),
        "pos": torch.full((6, 2), 7.0),
        "position_ids": torch.arange(4),
        "head": torch.full((4, 3), 6.0),
    },
}
REASONS = {
    "pos": "shapes differ: [4, 2] in pretrained, [4, 2] in a, [6, 2] in b",
    "extra_norm": "missing in b",
    "head": "missing in pretrained",
}


def merge(method: str, **params):
    return mergebench.merge(method, PRE, FT, progress=False, task_specific="auto", **params)


def assert_own_tensors(result) -> None:
    a, b = result.state_dict("a"), result.state_dict("b")
    assert set(a) == {"w", "pos", "extra_norm", "position_ids", "head"}
    assert set(b) == {"w", "pos", "position_ids", "head"}  # b has no extra_norm of its own
    for task, state in (("a", a), ("b", b)):
        for key in ("pos", "extra_norm", "head"):
            if key in FT[task]:
                assert torch.equal(state[key], FT[task][key]), (task, key)
        assert torch.equal(state["position_ids"], PRE["position_ids"])


@pytest.mark.parametrize("output", [False, True])
def test_a_single_model_method_merges_the_common_keys_only(output, tmp_path):
    out = tmp_path / "ta" if output else None
    result = merge("task_arithmetic", scaling=0.5, output_dir=out)
    assert result.extra["task_specific_keys"] == REASONS
    # tau sum [4, 2, -4] * 0.5
    assert result.state_dict("a")["w"].tolist() == [2.0, 1.0, -2.0]
    assert_own_tensors(result)
    if output:  # the record survives the saved artifact
        loaded = mergebench.load_result(out)
        assert loaded.extra["task_specific_keys"] == REASONS
        assert_own_tensors(loaded)


@pytest.mark.parametrize("output", [False, True])
def test_emr_merges_the_common_keys_only(output, tmp_path):
    result = merge("emr", output_dir=tmp_path / "emr" if output else None)
    assert result.extra["task_specific_keys"] == REASONS
    assert set(result.unified) == {"w"}
    # sum [4, 2, -4] -> tau_uni [3, 2, -3]; masks a [1,1,1] b [1,0,1]
    # lam_a = mean|tau_a| / mean|M_a uni| = 6/8;  lam_b = 4 / 6
    assert result.unified["w"].tolist() == [3.0, 2.0, -3.0]
    assert result.rescalers == pytest.approx({"a": 0.75, "b": 4 / 6})
    torch.testing.assert_close(result.state_dict("b")["w"], torch.tensor([2.0, 0.0, -2.0]))
    assert_own_tensors(result)


def test_a_homogeneous_pool_records_no_key():
    pre = {"w": torch.zeros(2)}
    finetuned = {"a": {"w": torch.ones(2)}, "b": {"w": -torch.ones(2)}}
    result = mergebench.merge("task_arithmetic", pre, finetuned, progress=False,
                              task_specific="auto")  # fmt: skip
    assert result.extra["task_specific_keys"] == {}


def test_the_default_refuses_a_heterogeneous_pool():
    same_keys = {t: {k: v for k, v in sd.items() if k != "head"} for t, sd in FT.items()}
    same_keys["b"]["extra_norm"] = torch.ones(2)
    with pytest.raises(MergeBenchError, match=r"key 'pos': shape \[6, 2\] in"):
        mergebench.merge("task_arithmetic", PRE, same_keys, progress=False)
    with pytest.raises(MergeBenchError, match=r"'head' is not in pretrained"):
        mergebench.merge("task_arithmetic", PRE, FT, progress=False)


def test_an_unknown_mode_is_an_error_naming_the_option():
    with pytest.raises(MergeBenchError, match=r"task_specific: 'yes' is not one of"):
        mergebench.merge("emr", PRE, FT, progress=False, task_specific="yes")


def test_the_merge_cli_takes_the_option(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from mergebench.cli.merge import main as merge_main

    save_file(PRE, tmp_path / "pre.safetensors")
    for task, state in FT.items():
        save_file(state, tmp_path / f"{task}.safetensors")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "mergebench-merge", "method=task_arithmetic", "pretrained=pre.safetensors",
        "finetuned={a: a.safetensors, b: b.safetensors}", "output_dir=out",
        "task_specific=auto", "progress=false",
    ])  # fmt: skip
    merge_main()
    loaded = mergebench.load_result(tmp_path / "out")
    assert loaded.extra["task_specific_keys"] == REASONS
    assert_own_tensors(loaded)
