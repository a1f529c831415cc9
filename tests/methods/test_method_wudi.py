"""WUDI (methods.md, "WUDI"): hand-computed steps, the autograd reference, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import svd_pools
import torch

import mergebench
from mergebench.methods.wudi import _adam_step, wudi_matrix
from mergebench.reference.wudi import merge_wudi, wudi_fit, wudi_loss
from mergebench.util.errors import MergeBenchError

HEAD = r"head\..*"


SHAPES = {
    "embed.weight": (10, 4),
    "layer.weight": (6, 6),
    "layer.bias": (6,),
    "norm.weight": (6,),  # matches `keys` but is not a matrix
    "out.weight": (5, 9),
    "proj": (3, 4),  # a matrix that `keys` does not match
    "conv.weight": (3, 2, 2, 2),
    "position_ids": (5,),
    "head.weight": (2, 4),
}


def random_pool(seed: int = 0, num_tasks: int = 3, scale: float = 0.01):
    """Matrices (square, tall, wide), 1-D and 4-D tensors, a 2-D key that `keys` does not
    match, an integer buffer and a task-specific head (its shape differs per task)."""
    return svd_pools.random_pool(SHAPES, seed, num_tasks, scale)


def merge(pre, finetuned, **params):
    return mergebench.merge("wudi", pre, finetuned, exclude=[HEAD], progress=False, **params)


def test_one_step_by_hand():
    # tau_1 = [1, 0], tau_2 = [1, 1] (1 x 2 matrices); start tau_m = [2, 1].
    # L = ([1, 1].[1, 0])^2 / 1 + ([1, 0].[1, 1])^2 / 2 = 1 + 0.5 = 1.5
    # grad = 2 * (1 * [1, 0] / 1 + 1 * [1, 1] / 2) = [3, 1]; Adam's first step moves each
    # entry by lr * g / (|g| + eps) = lr against the gradient's sign: [1.9, 0.9] (lr 0.1).
    # Then L = 0.9^2 / 1 + 0.8^2 / 2 = 0.81 + 0.32 = 1.13.
    taus = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    merged, losses = wudi_matrix(taus, steps=1, lr=0.1)
    torch.testing.assert_close(merged, torch.tensor([[1.9, 0.9]]))
    np.testing.assert_allclose(losses, [1.5, 1.13], rtol=1e-6)
    # the same through merge (W_pre = 0), with keys matching the key
    pre = {"w": torch.zeros(1, 2)}
    finetuned = {"a": {"w": taus[0]}, "b": {"w": taus[1]}}
    result = mergebench.merge("wudi", pre, finetuned, steps=1, lr=0.1, keys="w", progress=False)
    torch.testing.assert_close(result.state_dict()["w"], torch.tensor([[1.9, 0.9]]))
    assert result.extra["loss"]["w"]["start"] == pytest.approx(1.5)
    assert result.extra["loss"]["w"]["end"] == pytest.approx(1.13, rel=1e-6)


def test_orthogonal_rows_leave_the_task_sum_in_place():
    # tau_s tau_t^T = 0 for s != t: the loss is 0 at the task sum, and so is the gradient.
    taus = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [0.0, -1.0]]])
    merged, losses = wudi_matrix(taus, steps=20, lr=0.1)
    torch.testing.assert_close(merged, taus[0] + taus[1])
    assert losses == [0.0] * 21


def test_a_zero_task_vector_has_no_term():
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(2, 5, 4, generator=g)
    with_zero = torch.cat([taus, torch.zeros(1, 5, 4)])
    merged, losses = wudi_matrix(with_zero, steps=10, lr=1e-2)
    expected, expected_losses = wudi_matrix(taus, steps=10, lr=1e-2)
    torch.testing.assert_close(merged, expected)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
    # every task vector zero: nothing moves, no nan
    merged, losses = wudi_matrix(torch.zeros(3, 4, 4), steps=5, lr=1e-2)
    assert torch.equal(merged, torch.zeros(4, 4)) and losses == [0.0] * 6


def test_zero_steps_is_the_task_sum():
    g = torch.Generator().manual_seed(2)
    taus = torch.randn(3, 4, 6, generator=g)
    merged, losses = wudi_matrix(taus, steps=0, lr=1e-2)
    torch.testing.assert_close(merged, taus[0] + taus[1] + taus[2])
    assert len(losses) == 1
    assert losses[0] == pytest.approx(float(wudi_loss(merged.double(), list(taus.double()))))


@pytest.mark.parametrize("lr", [1e-5, 1e-4])
def test_loss_decreases_from_the_task_sum(lr):
    g = torch.Generator().manual_seed(0)
    taus = 0.01 * torch.randn(4, 12, 8, generator=g)
    _, losses = wudi_matrix(taus, steps=300, lr=lr)
    assert len(losses) == 301
    assert losses[0] == pytest.approx(float(wudi_loss((taus.sum(0)).double(), list(taus.double()))))
    assert all(
        b < a for a, b in zip(losses[:-1], losses[1:], strict=True)
    )  # strictly, at these step sizes
    assert losses[-1] < 0.9 * losses[0]


def test_explicit_adam_is_torch_adam():
    g = torch.Generator().manual_seed(3)
    param = torch.randn(4, 3, generator=g)
    reference = torch.nn.Parameter(param.clone())
    optimizer = torch.optim.Adam([reference], lr=1e-2, foreach=False)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, 6):
        grad = torch.randn(4, 3, generator=g)
        reference.grad = grad.clone()
        optimizer.step()
        _adam_step(param, grad, exp_avg, exp_avg_sq, step, 1e-2)
        torch.testing.assert_close(param, reference.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_history_matches_the_autograd_reference(num_tasks):
    g = torch.Generator().manual_seed(4)
    taus = 0.05 * torch.randn(num_tasks, 7, 5, generator=g)
    merged, losses = wudi_matrix(taus, steps=50, lr=1e-3)
    expected, expected_losses = wudi_fit(list(taus.double()), steps=50, lr=1e-3)
    torch.testing.assert_close(merged.double(), expected, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4, atol=1e-12)


def test_rows_no_task_touches_stay_put_and_the_rest_match_the_reference():
    # An embedding table: most rows are zero in every task vector, so R0's row is 0 and the
    # fit skips it; the rows it fits must still follow the autograd reference.
    g = torch.Generator().manual_seed(7)
    taus = torch.zeros(3, 9, 5)
    taus[:, [1, 4, 6]] = 0.05 * torch.randn(3, 3, 5, generator=g)
    taus[2, 7] = 0.05 * torch.randn(5, generator=g)  # one task only: R0's row is not 0
    merged, losses = wudi_matrix(taus, steps=50, lr=1e-3)
    expected, expected_losses = wudi_fit(list(taus.double()), steps=50, lr=1e-3)
    torch.testing.assert_close(merged.double(), expected, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4, atol=1e-12)
    assert torch.equal(merged[[0, 2, 3, 5, 8]], torch.zeros(5, 5))
    assert not torch.equal(merged[7], taus[2, 7])  # fitted: the other tasks pull on it


def test_history_off_keeps_the_first_and_last_loss():
    g = torch.Generator().manual_seed(8)
    taus = 0.05 * torch.randn(3, 6, 4, generator=g)
    merged, losses = wudi_matrix(taus, steps=20, lr=1e-3)
    short_merged, short = wudi_matrix(taus, steps=20, lr=1e-3, history=False)
    assert torch.equal(short_merged, merged)
    assert short == [losses[0], losses[-1]]
    assert wudi_matrix(taus, steps=0, lr=1e-3, history=False)[1] == losses[:1]


@pytest.mark.parametrize("others", ["pretrained", "mean"])
@pytest.mark.parametrize("num_tasks", [2, 3])
def test_matches_the_reference(others, num_tasks):
    pre, finetuned = random_pool(seed=num_tasks, num_tasks=num_tasks)
    params = dict(steps=40, lr=1e-4, others=others)
    result = merge(pre, finetuned, **params)
    expected = merge_wudi(pre, finetuned, [HEAD], **params)
    out = result.state_dict()
    assert set(out) == set(expected) | {"head.weight"}
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value, atol=1e-6, rtol=1e-6, msg=key)
    assert torch.equal(out["position_ids"], pre["position_ids"])
    for task in finetuned:
        assert torch.equal(result.state_dict(task)["head.weight"], finetuned[task]["head.weight"])
    # fitted: the 2-D keys that fully match `.*\.weight`; the rest follow `others`
    assert sorted(result.extra["loss"]) == ["embed.weight", "layer.weight", "out.weight"]
    for key in ("norm.weight", "layer.bias", "proj", "conv.weight"):
        if others == "pretrained":
            assert torch.equal(out[key], pre[key])
        else:
            mean = sum(ft[key] - pre[key] for ft in finetuned.values()) / num_tasks
            torch.testing.assert_close(out[key], pre[key] + mean)
    for losses in result.extra["loss"].values():
        assert losses["end"] < losses["start"]


def test_keys_is_a_full_match():
    pre, finetuned = random_pool()
    result = merge(pre, finetuned, steps=2, keys="layer")  # matches no key in full
    assert result.extra["loss"] == {}
    assert torch.equal(result.state_dict()["layer.weight"], pre["layer.weight"])
    result = merge(pre, finetuned, steps=2, keys=r"(layer|proj)(\.weight)?")
    assert sorted(result.extra["loss"]) == ["layer.weight", "proj"]


def test_deterministic_on_cpu():
    pre, finetuned = random_pool(seed=5)
    first = merge(pre, finetuned, steps=30, lr=1e-4).state_dict()
    second = merge(pre, finetuned, steps=30, lr=1e-4).state_dict()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    pre, finetuned = random_pool(seed=4)
    cpu = merge(pre, finetuned, steps=40, lr=1e-4).state_dict()
    gpu = mergebench.merge(
        "wudi", pre, finetuned, exclude=[HEAD], device="cuda", progress=False, steps=40, lr=1e-4
    ).state_dict()
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("params", "option"),
    [
        ({"steps": -1}, "wudi.steps"),
        ({"steps": 1.5}, "wudi.steps"),
        ({"steps": "many"}, "wudi.steps"),
        ({"steps": True}, "wudi.steps"),
        ({"steps": float("inf")}, "wudi.steps"),
        ({"lr": 0.0}, "wudi.lr"),
        ({"lr": -1e-5}, "wudi.lr"),
        ({"lr": float("nan")}, "wudi.lr"),
        ({"lr": float("inf")}, "wudi.lr"),
        ({"keys": "(unclosed"}, "wudi.keys"),
        ({"keys": 3}, "wudi.keys"),
        ({"others": "zero"}, "wudi.others"),
    ],
)
def test_rejects_bad_options(params, option):
    pre, finetuned = random_pool()
    with pytest.raises(MergeBenchError, match=option.replace(".", r"\.")):
        merge(pre, finetuned, **params)


def test_loss_summary_is_saved_with_the_result(tmp_path):
    import json

    pre, finetuned = random_pool(seed=6)
    result = merge(pre, finetuned, steps=5, lr=1e-4)
    path = result.save(tmp_path / "wudi")
    saved = json.loads((path / "result.json").read_text())
    assert saved["extra"]["loss"] == result.extra["loss"]
    assert saved["params"] == {
        "steps": 5,
        "lr": 1e-4,
        "keys": r".*\.weight",
        "others": "pretrained",
    }
