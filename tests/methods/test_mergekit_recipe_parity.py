"""mergekit recipes run by mergebench (`mergekit=recipe.yml`) against mergekit 0.1.5's own
`mergekit-yaml` on the same tiny Llama checkpoints (float32 recipes), tensor by tensor; DARE
and DELLA by their keep rates and rescaling. mergekit is not a dependency: it is run from
`$MERGEKIT_PYTHON` (a Python with mergekit installed, e.g. a separate venv) or from this
interpreter when it imports mergekit; without either, skipped."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_llm
import torch
import yaml
from safetensors.torch import load_file

import mergebench
from mergebench.methods.mergekit_recipes import from_recipe


def _mergekit_python() -> str | None:
    configured = os.environ.get("MERGEKIT_PYTHON")
    if configured:
        return configured
    return sys.executable if importlib.util.find_spec("mergekit") is not None else None


MERGEKIT_PYTHON = _mergekit_python()
pytestmark = pytest.mark.skipif(
    MERGEKIT_PYTHON is None,
    reason="mergekit is not installed (set MERGEKIT_PYTHON to a Python with mergekit==0.1.5)",
)

# Float32 on both sides: the methods' float64 sums and `W_pre + (W - W_pre)` differ from
# mergekit's float32 arithmetic by a few ulps.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def llama_pool(tmp_path_factory) -> dict[str, Path]:
    return tiny_llm.mergekit_llama_pool(tmp_path_factory.mktemp("llama"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def run_both(recipe: dict, tmp_path: Path) -> tuple[dict, dict]:
    """(mergebench's merged weights, mergekit's) for one recipe."""
    path, out = tmp_path / "recipe.yml", tmp_path / "mergekit"
    path.write_text(yaml.safe_dump(recipe))
    assert MERGEKIT_PYTHON is not None
    done = subprocess.run(
        [MERGEKIT_PYTHON, "-m", "mergekit.scripts.run_yaml", str(path), str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    run = from_recipe(recipe)
    ours = mergebench.merge(
        run.method, run.pretrained, run.finetuned, out_dtype=run.out_dtype, progress=False,
        **run.params,
    ).state_dict()  # fmt: skip
    return ours, weights(out)


def models(pool, names, **params) -> list[dict]:
    return [{"model": str(pool[n]), **({"parameters": params} if params else {})} for n in names]


def deterministic_recipes(pool) -> dict[str, dict]:
    base = str(pool["base"])
    abc = ("a", "b", "c")
    return {
        "linear": {"merge_method": "linear", "models": models(pool, ("base", *abc), weight=2.0)},
        "linear_base": {  # base_model not in models: one more input, weighted by parameters
            "merge_method": "linear", "base_model": base, "models": models(pool, abc),
            "parameters": {"weight": 0.25, "normalize": False},
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic", "base_model": base,
            "models": models(pool, abc, weight=0.4), "parameters": {"lambda": 0.9},
        },
        "task_arithmetic_normalize": {
            "merge_method": "task_arithmetic", "base_model": base,
            "models": models(pool, abc, weight=0.4), "parameters": {"normalize": True},
        },
        "ties": {
            "merge_method": "ties", "base_model": base,
            "models": models(pool, abc, weight=0.7, density=0.5), "parameters": {"lambda": 0.8},
        },
        "ties_sum": {
            "merge_method": "ties", "base_model": base,
            "models": models(pool, abc, weight=0.6, density=0.25),
            "parameters": {"normalize": False, "int8_mask": True},
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs", "base_model": base,
            "models": models(pool, abc, weight=0.5, density=0.3, gamma=0.05),
        },
        "slerp": {
            "merge_method": "slerp", "base_model": str(pool["a"]),
            "models": models(pool, ("a", "b")), "parameters": {"t": 0.3},
        },
        "model_stock": {
            "merge_method": "model_stock", "base_model": base, "models": models(pool, abc),
        },
    }  # fmt: skip


NAMES = [
    "linear", "linear_base", "task_arithmetic", "task_arithmetic_normalize", "ties", "ties_sum", "breadcrumbs",
    "slerp", "model_stock",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_recipe_equals_mergekit(name, llama_pool, tmp_path):
    recipe = {**deterministic_recipes(llama_pool)[name], "dtype": "float32"}
    ours, theirs = run_both(recipe, tmp_path)
    assert set(theirs) <= set(ours)
    worst = max((ours[k] - v).abs().max().item() for k, v in theirs.items())
    print(f"{name}: max |mergebench - mergekit| = {worst:.3g}")
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, **TOLERANCE, msg=key)


@pytest.mark.parametrize(
    ("method", "extra"),
    [("dare_linear", {}), ("dare_ties", {}), ("della", {"epsilon": 0.2})],
)
def test_dare_and_della_keep_rates_and_rescaling_match_mergekit(method, extra, llama_pool,
                                                                 tmp_path):  # fmt: skip
    # One expert (no election to mix the draws): the share of entries that moved off the
    # base, and the L1 mass of the kept task vector against the whole one, on both sides.
    recipe = {
        "merge_method": method, "base_model": str(llama_pool["base"]), "dtype": "float32",
        "models": models(llama_pool, ("c",), weight=1.0, density=0.4, **extra),
    }  # fmt: skip
    ours, theirs = run_both(recipe, tmp_path)
    base, expert = weights(llama_pool["base"]), weights(llama_pool["c"])
    stats = {}
    for side, merged in (("mergebench", ours), ("mergekit", theirs)):
        kept = total = 0
        mass = full = 0.0
        for key in theirs:
            delta = merged[key].double() - base[key].double()
            kept += int((delta != 0).sum())
            total += delta.numel()
            mass += delta.abs().sum().item()
            full += (expert[key].double() - base[key].double()).abs().sum().item()
        stats[side] = (kept / total, mass / full)
    print(f"{method}: keep rate, L1 ratio {stats}")
    for rate, ratio in stats.values():
        assert abs(rate - 0.4) < 0.03  # ~13,000 entries: sd 0.005
        assert abs(ratio - 1) < 0.05


def test_ties_keep_count_is_the_only_difference_from_mergekit(llama_pool, tmp_path):
    # density 0.3: where the fraction of 0.3 * n is >= 0.5 we keep floor(0.3 n + 0.5), one
    # entry more than mergekit's int(0.3 n) (docs/methods.md, "mergekit recipes"); every
    # other entry agrees to a few ulps.
    recipe = {
        **deterministic_recipes(llama_pool)["ties"], "dtype": "float32",
        "models": models(llama_pool, ("a", "b", "c"), weight=0.7, density=0.3),
    }  # fmt: skip
    ours, theirs = run_both(recipe, tmp_path)
    differing = extra = 0
    for key, value in theirs.items():
        close = torch.isclose(ours[key], value, **TOLERANCE)
        differing += int((~close).sum())
        n = value.numel()
        extra += 3 * (math.floor(0.3 * n + 0.5) - max(1, int(0.3 * n)))
    print(f"ties density 0.3: {differing} entries differ, {extra} extra kept")
    assert extra > 0 and differing <= extra
