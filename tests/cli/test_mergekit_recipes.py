"""`mergebench-merge mergekit=recipe.yml` runs mergekit recipes on mergebench's methods, and
`mergekit_out=` writes a run's recipe: hand-computed merges on tiny tensors, the recipe ->
method mapping of every merge_method, round trips, DARE/DELLA keep rates and rescaling, and
bad recipes (one line, exit 2, nothing written). Parity with mergekit's own output:
tests/methods/test_mergekit_recipe_parity.py."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

import mergebench
from mergebench.cli.merge import main as merge_main
from mergebench.methods.mergekit_recipes import from_recipe, read_recipe, to_recipe
from mergebench.util.errors import MergeBenchError

# Task vectors of two experts on a 2 x 4 tensor and a 4-entry vector (base is zero, so the
# fine-tuned weights are the task vectors).
TAU_A = {"w": [[4.0, -1.0, 0.5, 2.0], [-3.0, 1.5, 0.25, -0.5]], "v": [1.0, -2.0, 3.0, 0.1]}
TAU_B = {"w": [[-2.0, 3.0, 0.5, 1.0], [1.0, -4.0, 2.5, 0.75]], "v": [-3.0, 1.0, 1.0, 0.2]}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    save_file({"w": torch.zeros(2, 4), "v": torch.zeros(4)}, folder / "base.safetensors")
    for name, tau in (("a", TAU_A), ("b", TAU_B)):
        save_file({k: torch.tensor(v) for k, v in tau.items()}, folder / f"{name}.safetensors")
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


def recipe_file(tmp_path, pool, method, params=None, model_params=None, base=True, **extra):
    recipe = {"merge_method": method, **extra}
    if base:
        recipe["base_model"] = str(pool / "base.safetensors")
    recipe["models"] = [
        {"model": str(pool / f"{t}.safetensors"), "parameters": dict(model_params or {})}
        for t in "ab"
    ]
    if params:
        recipe["parameters"] = params
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_recipe(tmp_path, pool, monkeypatch, capsys, out="out", **recipe) -> dict:
    path = recipe_file(tmp_path, pool, **recipe)
    out = tmp_path / out
    code, err = run_cli(
        tmp_path, monkeypatch, capsys, f"mergekit={path}", f"output_dir={out}", "progress=false"
    )
    assert code == 0, err
    return mergebench.load_result(out).state_dict()


def test_task_arithmetic_weights_and_lambda(pool, tmp_path, monkeypatch, capsys):
    # base + lambda * sum_t w * tau_t = 2 * 0.25 * (tau_a + tau_b); normalize divides by 0.5.
    got = run_recipe(
        tmp_path, pool, monkeypatch, capsys, method="task_arithmetic",
        params={"lambda": 2.0}, model_params={"weight": 0.25},
    )  # fmt: skip
    torch.testing.assert_close(got["v"], torch.tensor([-1.0, -0.5, 2.0, 0.15]))
    normalized = run_recipe(
        tmp_path, pool, monkeypatch, capsys, out="normalized", method="task_arithmetic",
        params={"lambda": 2.0, "normalize": True}, model_params={"weight": 0.25},
    )  # fmt: skip
    torch.testing.assert_close(normalized["v"], torch.tensor([-2.0, -1.0, 4.0, 0.3]))


def test_ties_is_mergekits_trim_elect_and_weighted_disjoint_mean(pool, tmp_path, monkeypatch,
                                                                 capsys):  # fmt: skip
    # w, density 0.5: each task keeps 4 of 8 entries (mergekit: int(0.5 * 8)), per tensor.
    # a keeps 4, 2 (row 0) and -3, 1.5 (row 1); b keeps -2, 3 (row 0) and -4, 2.5 (row 1).
    # Sums [[2, 3, 0, 2], [-3, -2.5, 2.5, 0]] elect + + . + / - - + .; each entry is the mean
    # of the kept values that agree (one weight for all: mergekit's weighted mean is the
    # mean); entries no task keeps stay 0.
    got = run_recipe(
        tmp_path, pool, monkeypatch, capsys, method="ties",
        params={"lambda": 1.0}, model_params={"weight": 0.7, "density": 0.5},
    )  # fmt: skip
    expected = torch.tensor([[4.0, 3.0, 0.0, 2.0], [-3.0, -4.0, 2.5, 0.0]])
    assert torch.equal(got["w"], expected)


def test_linear_is_the_mean_of_the_models(pool, tmp_path, monkeypatch, capsys):
    got = run_recipe(
        tmp_path, pool, monkeypatch, capsys, method="linear", base=False,
        model_params={"weight": 3.0},
    )  # fmt: skip
    expected = (torch.tensor(TAU_A["w"]) + torch.tensor(TAU_B["w"])) / 2
    torch.testing.assert_close(got["w"], expected, rtol=0, atol=1e-6)


def test_breadcrumbs_ranks_the_whole_tensor(pool, tmp_path, monkeypatch, capsys):
    # w: 8 entries, gamma 0.125 -> drop the largest 1, density 0.25 -> keep the next 2.
    # a: |4| dropped, keep -3 and 2; b: |-4| dropped, keep 3 and 2.5. lambda 1, weight 0.5.
    got = run_recipe(
        tmp_path, pool, monkeypatch, capsys, method="breadcrumbs",
        model_params={"weight": 0.5, "density": 0.25, "gamma": 0.125},
    )  # fmt: skip
    expected = 0.5 * torch.tensor([[0.0, 3.0, 0.0, 2.0], [-3.0, 0.0, 2.5, 0.0]])
    assert torch.equal(got["w"], expected)


BASE, A, B = "/m/base", "/m/a", "/m/b"


def recipe(method, params=None, model_params=None, base=BASE, models=(A, B)):
    out = {"merge_method": method, "models": [
        {"model": m, "parameters": dict(model_params or {})} for m in models
    ]}  # fmt: skip
    if base:
        out["base_model"] = base
    if params:
        out["parameters"] = params
    return out


W = {"weight": 0.5}
TIES_MEAN = {"k": 0.3, "topk_scope": "tensor", "aggregate": "mean", "scaling": 2.0}


@pytest.mark.parametrize(
    ("rec", "method", "params"),
    [
        (recipe("linear", model_params=W, base=None), "weight_averaging", {}),
        (recipe("task_arithmetic", {"lambda": 2.0}, W), "task_arithmetic", {"scaling": 1.0}),
        (recipe("task_arithmetic", {"normalize": True}, W), "task_arithmetic", {"scaling": 0.5}),
        (recipe("ties", {"lambda": 2.0}, {**W, "density": 0.3}), "ties", TIES_MEAN),
        (recipe("ties", {"normalize": False}, {**W, "density": 0.3}), "ties",
         {**TIES_MEAN, "aggregate": "sum", "scaling": 0.5}),
        (recipe("dare_ties", None, {**W, "density": 0.25}), "dare",
         {"base": "ties", "drop": 0.75, "rescale": True,
          "base_params": {"k": 1.0, "topk_scope": "tensor", "aggregate": "sum", "scaling": 0.5}}),
        (recipe("dare_linear", {"rescale": False}, {**W, "density": 0.25}), "dare",
         {"base": "task_arithmetic", "drop": 0.75, "rescale": False,
          "base_params": {"scaling": 0.5}}),
        (recipe("breadcrumbs", None, {**W, "density": 0.2, "gamma": 0.05}), "breadcrumbs",
         {"density": 0.2, "outlier": 0.05, "scaling": 0.5, "scope": "tensor"}),
        (recipe("della", {"lambda": 1.5}, {**W, "density": 0.6, "epsilon": 0.1}), "della",
         {"density": 0.6, "window": 0.2, "scaling": 1.5, "rescale": True}),
        (recipe("slerp", {"t": 0.3}, models=(BASE, A)), "slerp",
         {"t": 0.3, "endpoints": ["base", "a"]}),
        (recipe("model_stock", {"filter_wise": True}, models=(BASE, A, B)), "model_stock",
         {"filter_wise": True}),
    ],
)  # fmt: skip
def test_each_merge_method_maps_to_a_method(rec, method, params):
    run = from_recipe(rec)
    assert (run.method, run.params) == (method, params)
    assert run.finetuned == ({"base": BASE, "a": A} if method == "slerp" else {"a": A, "b": B})
    assert run.pretrained == (A if rec.get("base_model") is None else BASE)


@pytest.mark.parametrize(
    ("rec", "needle"),
    [
        (recipe("sce"), "merge_method: 'sce' is not supported (choose from linear,"),
        (recipe("ties", None, {"weight": [0.1, 0.9], "density": 0.5}),
         "models[0].parameters.weight: per-layer gradient lists"),
        (recipe("ties", {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]}, W),
         "parameters.density: per-layer gradient lists"),
        (recipe("ties", None, W, base=None), "base_model: required by merge_method ties"),
        (recipe("slerp", None, models=(BASE, A)), "parameters.t: required by slerp"),
        (recipe("ties", None, {"density": 0.5}), "models[0].parameters.weight: required by ties"),
        ({**recipe("ties", None, W), "slices": []}, "slices: recipe key not supported"),
        ({**recipe("linear", None, W, base=None), "models": [{"model": A, "parameters": {"weight": 1.0}},
                                                   {"model": B, "parameters": {"weight": 2.0}}]},
         "models[1].parameters.weight: 2.0 differs from models[0].parameters.weight (1.0)"),
        (recipe("linear", {"normalize": False}, {"weight": 1.0}, base=None),
         "normalize=False sums to 2.0"),
        (recipe("ties", {"rescale": True}, {**W, "density": 0.5}), "parameters.rescale: true"),
        (recipe("della", {"normalize": False}, W), "parameters.normalize: false"),
        (recipe("della_linear", None, W), "merge_method: della_linear has no mergebench method"),
        (recipe("breadcrumbs_ties", None, W), "merge_method: breadcrumbs_ties has no mergebench"),
        (recipe("ties", None, {**W, "lambda": 1.0}), "not a per-model parameter"),
        (recipe("model_stock", None, models=(BASE, A)), "model_stock needs at least two models"),
        (recipe("linear", None, W), "base_model: linear merges it as one more model and needs"),
        (recipe("ties", {"t": 0.5}, W), "parameters.t: not a parameter of merge_method ties"),
        (recipe("slerp", {"t": 0.5}, W, models=(BASE, A)),
         "models[0].parameters.weight: not a parameter of merge_method slerp"),
    ],
)  # fmt: skip
def test_bad_recipes_are_one_line(rec, needle):
    with pytest.raises(MergeBenchError) as err:
        from_recipe(rec)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_linear_sums_to_one_without_normalize():
    run = from_recipe(recipe("linear", {"normalize": False}, W, base=None))
    assert run.method == "weight_averaging"


def test_linear_merges_a_base_model_outside_models_as_one_more_model():
    run = from_recipe(recipe("linear", {"weight": 1.0}))
    assert run.method == "weight_averaging" and run.pretrained == BASE
    assert run.finetuned == {"a": A, "b": B, "base": BASE}


@pytest.mark.parametrize(
    ("rec", "args"),
    [
        (None, ["method=emr"]),
        ("sce", []),
        ("gradient", []),
        ("no_base", []),
    ],
)  # fmt: skip
def test_cli_refusals_exit_2_and_write_nothing(rec, args, pool, tmp_path, monkeypatch, capsys):
    out, written = tmp_path / "out", tmp_path / "written.yml"
    if rec is None:  # a run whose method mergekit lacks, asked for its recipe
        cli = ["method=emr", f"pretrained={pool}/base.safetensors",
               f"finetuned={{a: {pool}/a.safetensors, b: {pool}/b.safetensors}}"]  # fmt: skip
        needle = "mergekit_out: method emr has no mergekit merge_method"
    else:
        model_params = {"weight": [0.1, 0.2] if rec == "gradient" else 0.5}
        method = "sce" if rec == "sce" else "ties"
        path = recipe_file(tmp_path, pool, method, model_params=model_params, base=rec != "no_base")
        cli = [f"mergekit={path}"]
        needle = {"sce": "merge_method: 'sce'", "gradient": "models[0].parameters.weight: per-layer",
                  "no_base": "base_model: required"}[rec]  # fmt: skip
    code, err = run_cli(
        tmp_path, monkeypatch, capsys, *cli, f"output_dir={out}", f"mergekit_out={written}",
        "progress=false",
    )  # fmt: skip
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not written.exists()


def test_recipe_and_method_on_one_command_line_is_refused(pool, tmp_path, monkeypatch, capsys):
    path = recipe_file(tmp_path, pool, "task_arithmetic", model_params=W)
    code, err = run_cli(
        tmp_path, monkeypatch, capsys, f"mergekit={path}", "method=ties",
        f"output_dir={tmp_path / 'out'}",
    )  # fmt: skip
    assert code == 2 and "method: given with mergekit=" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "rec",
    [
        recipe("linear", {"normalize": True}, {"weight": 1.0}, base=None),
        recipe("task_arithmetic", {"lambda": 2.0}, W),
        recipe("ties", {"lambda": 1.5}, {**W, "density": 0.5}),
        recipe("ties", {"normalize": False}, {**W, "density": 0.5}),
        recipe("dare_ties", None, {**W, "density": 0.25}),
        recipe("dare_linear", None, {**W, "density": 0.25}),
        recipe("breadcrumbs", None, {**W, "density": 0.5, "gamma": 0.125}),
        recipe("della", None, {**W, "density": 0.5, "epsilon": 0.125}),
        recipe("slerp", {"t": 0.3}, models=("/m/x", "/m/y"), base="/m/x"),
        recipe("model_stock", None, models=(A, B, "/m/c")),
    ],
    ids=lambda r: r["merge_method"],
)
def test_round_trip_keeps_the_recipes_semantics(rec, tmp_path):
    run = from_recipe(rec)
    written = to_recipe(run.method, run.params, run.pretrained, run.finetuned, "bfloat16")
    assert written["dtype"] == "bfloat16"
    again = from_recipe(written)
    assert (again.method, again.params, again.finetuned) == (run.method, run.params, run.finetuned)
    assert again.pretrained == run.pretrained


def test_cli_round_trip_writes_the_recipe_and_the_same_weights(pool, tmp_path, monkeypatch,
                                                               capsys):  # fmt: skip
    path = recipe_file(tmp_path, pool, "ties", {"lambda": 1.0}, {"weight": 1.0, "density": 0.5})
    first, second, written = tmp_path / "first", tmp_path / "second", tmp_path / "out.yml"
    code, err = run_cli(
        tmp_path, monkeypatch, capsys, f"mergekit={path}", f"output_dir={first}",
        f"mergekit_out={written}", "progress=false",
    )  # fmt: skip
    assert code == 0, err
    assert read_recipe(written)["merge_method"] == "ties"
    code, err = run_cli(
        tmp_path, monkeypatch, capsys, f"mergekit={written}", f"output_dir={second}",
        "progress=false",
    )  # fmt: skip
    assert code == 0, err
    a, b = mergebench.load_result(first).state_dict(), mergebench.load_result(second).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_command_line_run_writes_its_recipe(pool, tmp_path, monkeypatch, capsys):
    written = tmp_path / "r.yml"
    code, err = run_cli(
        tmp_path, monkeypatch, capsys, "method=ties", "method.topk_scope=tensor", "method.k=0.5",
        "method.aggregate=mean", "method.scaling=0.8", f"pretrained={pool}/base.safetensors",
        f"finetuned={{a: {pool}/a.safetensors, b: {pool}/b.safetensors}}",
        f"output_dir={tmp_path / 'out'}", f"mergekit_out={written}", "progress=false",
    )  # fmt: skip
    assert code == 0, err
    assert read_recipe(written) == {
        "merge_method": "ties", "base_model": f"{pool}/base.safetensors",
        "models": [{"model": f"{pool}/{t}.safetensors",
                    "parameters": {"weight": 1.0, "density": 0.5}} for t in "ab"],
        "parameters": {"normalize": True, "lambda": 0.8},
    }  # fmt: skip


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory):
    """One expert with 200,000 entries of |tau| in [1, 2): keep rates and rescaling."""
    folder = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(12345)  # not DARE's own stream (seed 0, task 0)
    tau = (1 + torch.rand(400, 500, generator=g)) * torch.sign(torch.randn(400, 500, generator=g))
    save_file({"w": torch.zeros(400, 500)}, folder / "base.safetensors")
    save_file({"w": tau}, folder / "a.safetensors")
    return folder, tau


@pytest.mark.parametrize(
    ("method", "extra"),
    [("dare_linear", {}), ("dare_ties", {}), ("della", {"epsilon": 0.2})],
)
def test_dare_and_della_keep_rates_and_rescaling(method, extra, big_pool):
    # mergekit keeps each entry with probability `density` (DELLA: density -/+ epsilon by
    # rank within each row) and rescales the kept entries to the tensor's L1 norm; ours
    # divides by the keep probability, equal in expectation: both keep the L1 mass.
    folder, tau = big_pool
    rec = {
        "merge_method": method, "base_model": str(folder / "base.safetensors"),
        "models": [{"model": str(folder / "a.safetensors"),
                    "parameters": {"weight": 1.0, "density": 0.3, **extra}}],
    }  # fmt: skip
    run = from_recipe(rec)
    got = mergebench.merge(
        run.method, run.pretrained, run.finetuned, progress=False, **run.params
    ).state_dict()["w"]
    kept = got != 0
    rate = kept.float().mean().item()
    assert abs(rate - 0.3) < 0.005  # 200,000 draws: sd 0.001
    assert abs(got.abs().sum().item() / tau.abs().sum().item() - 1) < 0.02
    if method != "della":
        torch.testing.assert_close(got[kept], tau[kept] / 0.3)
    else:  # DELLA: q runs from 0.1 (smallest |tau| of a row) to 0.5 (largest) by rank;
        # the 50 smallest of each 500-entry row average 0.1 + 0.4 * 24.5 / 499, the 50
        # largest 0.1 + 0.4 * 474.5 / 499 (20,000 draws each: sd 0.003).
        order = tau.abs().argsort(dim=1)
        low, high = kept.gather(1, order[:, :50]), kept.gather(1, order[:, -50:])
        assert abs(low.float().mean().item() - 0.11964) < 0.01
        assert abs(high.float().mean().item() - 0.48036) < 0.01
