"""`slerp` and `model_stock` equal mergekit's own output on the same tiny Llama checkpoints
(float32 recipes), tensor by tensor. mergekit is not a dependency: without it, skipped."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tiny_llm
import torch
from safetensors.torch import load_file

import mergebench

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None,
    reason="mergekit is not installed (optional: pip install mergekit==0.1.5 beside mergebench)",
)

# Float32 on both sides: mergebench's float64 sums and its `W_pre + (W - W_pre)` differ from
# mergekit's float32 arithmetic by a few ulps.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def llama_pool(tmp_path_factory) -> dict[str, Path]:
    return tiny_llm.mergekit_llama_pool(tmp_path_factory.mktemp("llama"))


def mergekit_merge(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(recipe), str(out), options=MergeOptions())
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        merged.update(load_file(shard))
    return merged


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, **TOLERANCE, msg=key)


@pytest.mark.parametrize("t", [0.3, 0.5])
def test_slerp_matches_mergekit(llama_pool, tmp_path, t):
    a, b = str(llama_pool["a"]), str(llama_pool["b"])
    recipe = {
        "merge_method": "slerp", "base_model": a, "dtype": "float32",
        "models": [{"model": a}, {"model": b}], "parameters": {"t": t},
    }  # fmt: skip
    theirs = mergekit_merge(recipe, tmp_path / "mergekit")
    ours = mergebench.merge(
        "slerp", llama_pool["base"], {"a": llama_pool["a"], "b": llama_pool["b"]}, t=t,
        progress=False,
    ).state_dict()  # fmt: skip
    compare(ours, theirs)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(llama_pool, tmp_path, filter_wise):
    base = str(llama_pool["base"])
    experts = {name: llama_pool[name] for name in ("a", "b", "c")}
    recipe = {
        "merge_method": "model_stock", "base_model": base, "dtype": "float32",
        "models": [{"model": str(path)} for path in experts.values()],
        "parameters": {"filter_wise": filter_wise},
    }  # fmt: skip
    theirs = mergekit_merge(recipe, tmp_path / "mergekit")
    ours = mergebench.merge(
        "model_stock", llama_pool["base"], experts, filter_wise=filter_wise, progress=False
    ).state_dict()
    compare(ours, theirs)
