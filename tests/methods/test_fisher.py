"""Fisher merging: the Fisher itself against a closed form; how Fishers combine."""

from __future__ import annotations

import pytest
import torch
from data_toys import HEAD, ToyFamily, mlp_pool
from torch import nn

import mergebench.methods.fisher as fisher_module
from mergebench.api import merge_pool
from mergebench.engine.pool import ModelPool
from mergebench.methods.data_utils import InputsOnly
from mergebench.util.errors import MergeBenchError


class SoftmaxRegression(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_diagonal_fisher_equals_the_closed_form_for_softmax_regression():
    g = torch.Generator().manual_seed(0)
    model = SoftmaxRegression(3, 4)
    x = torch.randn(9, 3, generator=g)
    family = ToyFamily({"a": {"train": x}}, lambda task: SoftmaxRegression(3, 4))
    data = InputsOnly(family, "fisher", "toy")
    fisher, examples = fisher_module.diagonal_fisher(
        data, model, ["layer.weight", "layer.bias"], "a", "train", None, 4, torch.device("cpu")
    )
    # d log p_y / d z = e_y - p;  d z_i / d W_ij = x_j:  F = E_x sum_y p_y (e_y - p)^2 (x)^2.
    with torch.no_grad():
        p = torch.softmax(model(x).double(), dim=-1)  # [B, C]
    eye = torch.eye(4, dtype=torch.float64)
    diff_sq = (eye[None, :, :] - p[:, None, :]) ** 2  # [B, y, i]
    bias = (p[:, :, None] * diff_sq).sum(1)  # [B, i]
    weight = bias[:, :, None] * (x.double() ** 2)[:, None, :]  # [B, i, j]
    assert examples == 9
    torch.testing.assert_close(fisher["layer.bias"].double(), bias.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        fisher["layer.weight"].double(), weight.mean(0), rtol=1e-5, atol=1e-7
    )


def weight_average(pool: ModelPool) -> dict[str, torch.Tensor]:
    return merge_pool("weight_averaging", pool, progress=False).state_dict("a")


@pytest.mark.parametrize("normalize", [True, False])
def test_equal_fishers_give_weight_averaging(monkeypatch, normalize):
    pool, _ = mlp_pool(tasks=("a", "b", "c"), classes=(2, 3, 4))
    g = torch.Generator().manual_seed(1)
    shared = {}

    def same_fisher(data, model, keys, task, *args, **kwargs):
        for key in keys:
            if key not in shared:
                shape = dict(model.named_parameters())[key].shape
                shared[key] = torch.rand(shape, generator=g) + 0.1
        return {k: shared[k].clone() for k in keys}, 1

    monkeypatch.setattr(fisher_module, "diagonal_fisher", same_fisher)
    merged = merge_pool("fisher", pool, progress=False, normalize=normalize).state_dict("a")
    expected = weight_average(pool)
    for key in pool.pretrained.keys():
        if not key.startswith("classifier"):
            torch.testing.assert_close(merged[key], expected[key])


@pytest.mark.parametrize("normalize", [True, False])
def test_one_dominant_fisher_returns_that_model(monkeypatch, normalize):
    pool, _ = mlp_pool(tasks=("a", "b", "c"), classes=(2, 3, 4))

    def fishers(data, model, keys, task, *args, **kwargs):
        params = dict(model.named_parameters())
        if task == "b":  # confident about every parameter
            return {k: torch.ones(params[k].shape) for k in keys}, 1
        # The others put (almost) all their Fisher mass on one entry of norm.bias, so even
        # after normalising each Fisher to unit norm, task b dominates everywhere else.
        out = {k: torch.full(params[k].shape, 1e-12) for k in keys}
        out["norm.bias"][0] = 1.0
        return out, 1

    monkeypatch.setattr(fisher_module, "diagonal_fisher", fishers)
    merged = merge_pool("fisher", pool, progress=False, normalize=normalize).state_dict("a")
    for key in pool.pretrained.keys():
        if not key.startswith("classifier"):
            got, want = merged[key], pool.finetuned["b"].get(key)
            if key == "norm.bias":
                got, want = got[1:], want[1:]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    average = weight_average(pool)
    assert not torch.allclose(merged["layer.weight"], average["layer.weight"], atol=1e-2)


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_normalize_equalises_tasks_of_different_scale(monkeypatch, normalize):
    """Task a's Fisher is 1 everywhere, task b's 3: normalised, both weigh the same (the
    weight average); unnormalised, b weighs three times as much as a."""
    pool, _ = mlp_pool(tasks=("a", "b"), classes=(2, 3))
    scale = {"a": 1.0, "b": 3.0}

    def flat_fisher(data, model, keys, task, *args, **kwargs):
        params = dict(model.named_parameters())
        return {k: torch.full_like(params[k], scale[task]).detach() for k in keys}, 8

    monkeypatch.setattr(fisher_module, "diagonal_fisher", flat_fisher)
    merged = merge_pool("fisher", pool, progress=False, normalize=normalize).state_dict("a")
    wa, wb = (0.5, 0.5) if normalize else (0.25, 0.75)
    for key in ("layer.weight", "layer.bias", "out.weight", "norm.weight"):
        a, b = pool.finetuned["a"].state_dict()[key], pool.finetuned["b"].state_dict()[key]
        torch.testing.assert_close(merged[key], wa * a + wb * b, rtol=1e-6, atol=1e-6)


def test_dominant_fisher_end_to_end_when_a_task_gives_no_gradient():
    """Task b's inputs are all zero: its first layer's weight gets no gradient (Fisher 0,
    floored to min_fisher), so the merge keeps task a's weight there."""
    pool, family = mlp_pool(tasks=("a", "b"), classes=(3, 3))
    family.inputs["b"]["train"] = torch.zeros_like(family.inputs["b"]["train"])
    result = merge_pool("fisher", pool, progress=False, num_examples=8, batch_size=3)
    merged = result.state_dict("a")
    torch.testing.assert_close(
        merged["layer.weight"], pool.finetuned["a"].get("layer.weight"), atol=1e-3, rtol=1e-3
    )
    # Elsewhere both tasks have information: neither model wins outright.
    for task in ("a", "b"):
        assert not torch.allclose(
            merged["out.weight"], pool.finetuned[task].get("out.weight"), atol=1e-3
        )
    assert set(result.extra["fisher_norms"]) == {"a", "b"}
    assert all(split == "train" for _, split in family.requests)


def test_no_information_anywhere_gives_the_average(monkeypatch):
    pool, _ = mlp_pool()

    def zeros(data, model, keys, task, *args, **kwargs):
        params = dict(model.named_parameters())
        return {k: torch.zeros(params[k].shape) for k in keys}, 1

    monkeypatch.setattr(fisher_module, "diagonal_fisher", zeros)
    merged = merge_pool("fisher", pool, progress=False).state_dict("a")
    expected = weight_average(pool)
    torch.testing.assert_close(merged["out.weight"], expected["out.weight"])


class BatchNormNet(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.classifier = nn.Linear(4, classes)

    def forward(self, x):
        return self.classifier(self.bn(self.layer(x)))


def test_buffers_without_gradient_are_averaged():
    g = torch.Generator().manual_seed(2)
    pre = BatchNormNet(2).state_dict()
    finetuned = {}
    for task in "ab":
        state = {k: v.clone() for k, v in pre.items()}
        for key in ("layer.weight", "bn.running_mean", "bn.running_var", "bn.weight"):
            state[key] = state[key] + torch.rand(state[key].shape, generator=g)
        finetuned[task] = state
    family = ToyFamily(
        {t: {"train": torch.randn(6, 3, generator=g)} for t in "ab"}, lambda task: BatchNormNet(2)
    )
    pool = ModelPool.from_checkpoints(pre, finetuned, exclude=HEAD, family=family)
    result = merge_pool("fisher", pool, progress=False)
    merged = result.state_dict("a")
    for key in ("bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(merged[key], (finetuned["a"][key] + finetuned["b"][key]) / 2)
        assert key in result.extra["averaged_without_fisher"]
    assert torch.equal(merged["bn.num_batches_tracked"], pre["bn.num_batches_tracked"])
    assert "layer.weight" not in result.extra["averaged_without_fisher"]


def test_options_are_validated():
    pool, _ = mlp_pool()
    with pytest.raises(MergeBenchError, match=r"fisher\.min_fisher"):
        merge_pool("fisher", pool, min_fisher=0)
    with pytest.raises(MergeBenchError, match=r"fisher\.normalize"):
        merge_pool("fisher", pool, normalize="yes")
    with pytest.raises(MergeBenchError, match=r"fisher\.batch_size"):
        merge_pool("fisher", pool, batch_size=0)


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 3)
        self.layer = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.emb(x)).mean(1))


def test_embedding_fisher_with_sparse_rows_equals_the_dense_computation():
    torch.manual_seed(3)
    model = Bag()
    x = torch.tensor([[1, 2, 2, 5], [3, 3, 3, 3], [0, 7, 1, 9]])  # repeated tokens
    family = ToyFamily({"a": {"train": x}}, lambda task: Bag())
    keys = ["emb.weight", "layer.weight", "layer.bias"]
    fisher, _ = fisher_module.diagonal_fisher(
        InputsOnly(family, "fisher", "toy"),
        model,
        keys,
        "a",
        "train",
        None,
        2,
        torch.device("cpu"),
    )
    assert model.emb.sparse is False  # restored
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for row in x:
        log_probs = torch.log_softmax(model(row[None]), dim=-1)[0]
        for label in range(4):
            model.zero_grad()
            log_probs[label].backward(retain_graph=True)
            for name, param in model.named_parameters():
                expected[name] += log_probs[label].exp().detach() * param.grad.square()
    for key in keys:
        torch.testing.assert_close(fisher[key], expected[key] / len(x))
    assert fisher["emb.weight"][4].abs().sum() == 0  # a token no example uses


def test_regression_head_uses_a_unit_gaussian():
    """One output (GLUE's STS-B): F = (d f / d theta)^2, i.e. x^2 for the weight, 1 for the bias."""
    model = SoftmaxRegression(3, 1)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    family = ToyFamily({"a": {"train": x}}, lambda task: SoftmaxRegression(3, 1))
    fisher, _ = fisher_module.diagonal_fisher(
        InputsOnly(family, "fisher", "toy"),
        model,
        ["layer.weight", "layer.bias"],
        "a",
        "train",
        None,
        2,
        torch.device("cpu"),
    )
    torch.testing.assert_close(fisher["layer.weight"], (x**2).mean(0, keepdim=True))
    torch.testing.assert_close(fisher["layer.bias"], torch.ones(1))
