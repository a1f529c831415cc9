"""AdaMerging: zero steps is task arithmetic (or TIES for ++); entropy goes down; the clamp holds;
coefficients are saved and plotted; M&R accepts AdaMerging++ as its base."""

from __future__ import annotations

import json

import pytest
import torch
from data_toys import mlp_pool

from mergebench.api import merge_pool
from mergebench.methods.adamerging import PLOT_FILE, prediction_entropy
from mergebench.results import TaskConditionedResult, load_result
from mergebench.util.errors import MergeBenchError

FAST = dict(accelerator="cpu", batch_size=8)


def body_keys(pool) -> list[str]:
    return [k for k in pool.pretrained.keys() if not k.startswith("classifier")]


def assert_same_models(pool, left, right) -> None:
    for task in pool.tasks:
        a, b = left.state_dict(task), right.state_dict(task)
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_zero_steps_equals_task_arithmetic_at_init(granularity):
    pool, _ = mlp_pool(tasks=("a", "b", "c"), classes=(2, 3, 4))
    ada = merge_pool("adamerging", pool, progress=False, steps=0, granularity=granularity)
    ta = merge_pool("task_arithmetic", pool, progress=False, scaling=0.3)
    assert_same_models(pool, ada, ta)
    coefficients = ada.extra["coefficients"]
    width = len(body_keys(pool)) if granularity == "layer" else 1
    assert all(values == pytest.approx([0.3] * width) for values in coefficients.values())


def test_zero_steps_plus_plus_equals_ties_dis_sum():
    pool, _ = mlp_pool(tasks=("a", "b", "c"), classes=(2, 3, 4))
    ada = merge_pool("adamerging", pool, progress=False, steps=0, ties=True, ties_k=0.3, init=0.5)
    ties = merge_pool("ties", pool, progress=False, k=0.3, scaling=0.5, aggregate="sum")
    assert_same_models(pool, ada, ties)
    plain = merge_pool("adamerging", pool, progress=False, steps=0, init=0.5)
    assert not torch.allclose(
        plain.state_dict("a")["out.weight"], ada.state_dict("a")["out.weight"]
    )


def mean_test_entropy(pool, family, result) -> float:
    total = 0.0
    for task in pool.tasks:
        model = family.build_model(task)
        model.load_state_dict(result.state_dict(task))
        with torch.no_grad():
            total += float(prediction_entropy(model(family.inputs[task]["test"])))
    return total


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_goes_down(granularity):
    pool, family = mlp_pool(tasks=("a", "b"), classes=(3, 4), examples=16)
    start = merge_pool("adamerging", pool, progress=False, steps=0)
    trained = merge_pool(
        "adamerging",
        pool,
        progress=False,
        steps=25,
        lr=0.05,
        granularity=granularity,
        batch_size=16,
        accelerator="cpu",
    )
    history = trained.extra["entropy"]
    assert len(history) == 25
    # Measured independently of the training loop, on all test inputs.
    assert mean_test_entropy(pool, family, trained) < mean_test_entropy(pool, family, start) - 1e-3
    assert history[-1] < history[0]
    assert {split for _, split in family.requests} == {"test"}
    values = trained.extra["coefficients"]["a"]
    assert any(abs(v - 0.3) > 1e-3 for v in values)  # the coefficients did move


def test_clamp_keeps_coefficients_in_unit_interval():
    pool, _ = mlp_pool(tasks=("a", "b"), classes=(3, 4), examples=16)
    # A huge learning rate throws raw coefficients far outside [0, 1].
    clamped = merge_pool("adamerging", pool, progress=False, steps=6, lr=2.0, **FAST)
    values = [v for vs in clamped.extra["coefficients"].values() for v in vs]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert any(v in (0.0, 1.0) for v in values)  # the clamp was actually needed
    free = merge_pool("adamerging", pool, progress=False, steps=6, lr=2.0, clamp=False, **FAST)
    values = [v for vs in free.extra["coefficients"].values() for v in vs]
    assert any(v < 0.0 or v > 1.0 for v in values)
    # The saved model is the one the applied (clamped) coefficients give.
    lam = clamped.extra["coefficients"]
    index = clamped.extra["coefficient_keys"].index("out.weight")
    pre = pool.pretrained.get("out.weight")
    expected = pre + sum(
        lam[t][index] * (pool.finetuned[t].get("out.weight") - pre) for t in pool.tasks
    )
    torch.testing.assert_close(clamped.state_dict("a")["out.weight"], expected)


def test_coefficients_are_saved_and_plotted(tmp_path):
    pool, _ = mlp_pool()
    result = merge_pool("adamerging", pool, progress=False, steps=2, **FAST)
    path = result.save(tmp_path / "ada")
    meta = json.loads((path / "result.json").read_text())
    assert meta["extra"]["coefficients"] == result.extra["coefficients"]
    assert meta["extra"]["coefficient_keys"] == body_keys(pool)
    png = (path / PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    loaded = load_result(path)
    assert loaded.extra["coefficients"] == result.extra["coefficients"]
    assert_same_models(pool, loaded, result)


def test_mask_rescale_accepts_adamerging_plus_plus_as_base():
    pool, family = mlp_pool(tasks=("a", "b", "c"), classes=(2, 3, 4))
    params = dict(ties=True, steps=0, init=0.3)
    result = merge_pool("mask_rescale", pool, progress=False, base="adamerging", base_params=params)
    assert isinstance(result, TaskConditionedResult)
    assert "coefficients" in result.extra["base_extra"]
    # tau_uni is AdaMerging++'s merged task vector (here TIES dis-sum at 0.3).
    ties = merge_pool("ties", pool, progress=False, scaling=0.3)
    key = "out.weight"
    expected = ties.state_dict("a")[key] - pool.pretrained.get(key)
    torch.testing.assert_close(result.unified[key], expected, atol=1e-6, rtol=1e-6)


def test_options_are_validated():
    pool, _ = mlp_pool()
    cases = {
        "granularity": "block",
        "init": 1.5,
        "lr": 0,
        "steps": -1,
        "precision": "8-true",
        "accelerator": "tpu9",
        "ties_k": 0,
        "ties": "yes",
    }
    for option, value in cases.items():
        with pytest.raises(MergeBenchError, match=rf"adamerging\.{option}"):
            merge_pool("adamerging", pool, **{option: value})


def test_mixed_precision_runs_and_keeps_float32_coefficients():
    pool, _ = mlp_pool()
    result = merge_pool("adamerging", pool, progress=False, steps=2, precision="bf16-mixed", **FAST)
    assert len(result.extra["entropy"]) == 2
    assert result.state_dict("a")["out.weight"].dtype == torch.float32
    assert any(v != 0.3 for v in result.extra["coefficients"]["a"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "method,params",
    [
        ("regmean", {}),
        ("fisher", {"num_examples": 8}),
        ("adamerging", {"steps": 3, "lr": 0.05, "accelerator": "gpu"}),
    ],
)
def test_gpu_gives_the_cpu_result(method, params):
    pool, _ = mlp_pool()
    cpu_params = {**params, "accelerator": "cpu"} if method == "adamerging" else params
    on_cpu = merge_pool(method, pool, progress=False, **cpu_params)
    on_gpu = merge_pool(method, pool, progress=False, device="cuda", **params)
    for key, value in on_cpu.state_dict("a").items():
        assert on_gpu.state_dict("a")[key].device.type == "cpu"
        torch.testing.assert_close(on_gpu.state_dict("a")[key], value, atol=1e-4, rtol=1e-4)


class BatchNormNet(torch.nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(5, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.classifier = torch.nn.Linear(6, classes)

    def forward(self, x):
        return self.classifier(torch.tanh(self.bn(self.layer(x))))


def test_batchnorm_statistics_follow_the_coefficients():
    from data_toys import HEAD, ToyFamily

    from mergebench.engine.pool import ModelPool

    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    pre = BatchNormNet(2).state_dict()
    finetuned = {}
    for task, classes in (("a", 3), ("b", 4)):
        state = {k: v.clone() for k, v in pre.items() if not k.startswith("classifier")}
        for key in ("layer.weight", "bn.weight", "bn.running_mean", "bn.running_var"):
            state[key] = state[key] + 0.3 * torch.rand(state[key].shape, generator=g)
        state |= {
            f"classifier.{k}": v for k, v in BatchNormNet(classes).classifier.state_dict().items()
        }
        finetuned[task] = state
    family = ToyFamily(
        {t: {"test": torch.randn(16, 5, generator=g)} for t in "ab"},
        lambda task: BatchNormNet(3 if task == "a" else 4),
    )
    pool = ModelPool.from_checkpoints(pre, finetuned, exclude=HEAD, family=family)
    result = merge_pool("adamerging", pool, progress=False, steps=3, lr=0.1, **FAST)
    lam = result.extra["coefficients"]
    index = result.extra["coefficient_keys"].index("bn.running_var")
    pre_var = pre["bn.running_var"]
    expected = pre_var + sum(
        lam[t][index] * (finetuned[t]["bn.running_var"] - pre_var) for t in "ab"
    )
    torch.testing.assert_close(result.state_dict("a")["bn.running_var"], expected)
    # Buffers get no gradient: their coefficients stay where they started.
    assert lam["a"][index] == pytest.approx(0.3)
    assert lam["a"][result.extra["coefficient_keys"].index("bn.weight")] != pytest.approx(0.3)


def test_merged_convolutions_keep_the_models_memory_format():
    from mergebench.methods.adamerging import MergedModels, _TaskLogits

    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    keys = ["weight", "bias"]
    pre = [conv.weight.detach().contiguous(), conv.bias.detach()]
    taus = [torch.randn(2, *conv.weight.shape), torch.randn(2, 4)]
    module = MergedModels(keys, pre, taus, [_TaskLogits(conv, None)] * 2, "layer", 0.3, True)
    weights = module.merged_weights()
    assert weights["weight"].is_contiguous(memory_format=torch.channels_last)
    expected = pre[0] + 0.3 * taus[0].sum(0)
    torch.testing.assert_close(weights["weight"], expected)
