"""CART (methods.md, "CART"): hand-computed cases, the float64 reference, edge cases."""

from __future__ import annotations

import pytest
import svd_pools
import torch

import mergebench
from mergebench.methods import cart, svd_utils
from mergebench.methods.cart import cart_delta, cart_rank
from mergebench.reference.cart import merge_cart
from mergebench.util.errors import MergeBenchError

HEAD = r"head\..*"


SHAPES = {
    "embed.weight": (10, 4),
    "layer.weight": (6, 6),
    "layer.bias": (6,),
    "out.weight": (5, 9),
    "conv.weight": (3, 2, 2, 2),
    "position_ids": (5,),
    "head.weight": (2, 4),
}


def random_pool(seed: int = 0, num_tasks: int = 3, scale: float = 0.1):
    """Matrices (square, tall, wide), 1-D and 4-D tensors, an integer buffer and a head
    that is task-specific (its shape differs per task)."""
    return svd_pools.random_pool(SHAPES, seed, num_tasks, scale)


def merge(pre, finetuned, **params):
    return mergebench.merge("cart", pre, finetuned, exclude=[HEAD], progress=False, **params)


@pytest.mark.parametrize(
    ("ratio", "m", "n", "k"),
    [(0.12, 768, 768, 92), (0.12, 3072, 768, 92), (0.12, 2, 5, 1), (1.0, 3, 4, 3), (0.5, 5, 7, 2)],
)
def test_rank_is_at_least_one(ratio, m, n, k):
    assert cart_rank(ratio, m, n) == k


def test_by_hand():
    # N = 3, 2 x 2, W_pre = I. tau = diag(6, 0), diag(0, 6), diag(0, 3): mean = diag(2, 3).
    # Centred: diag(4, -3), diag(-2, 3), diag(-2, 0); rank 1 (k = max(1, floor(0.12*2)) = 1):
    # diag(4, 0), diag(0, 3), diag(-2, 0); sum diag(2, 3).
    # W = W_avg + 2 * diag(2, 3) = I + diag(2, 3) + diag(4, 6).
    pre = {"w": torch.eye(2), "b": torch.tensor([1.0, -1.0])}
    taus = [torch.diag(torch.tensor(v)) for v in ([6.0, 0.0], [0.0, 6.0], [0.0, 3.0])]
    biases = [torch.tensor(v) for v in ([3.0, 0.0], [0.0, 3.0], [0.0, 0.0])]
    finetuned = {
        f"t{i}": {"w": pre["w"] + tau, "b": pre["b"] + bias}
        for i, (tau, bias) in enumerate(zip(taus, biases, strict=True))
    }
    out = mergebench.merge("cart", pre, finetuned, progress=False).state_dict()  # defaults
    torch.testing.assert_close(out["w"], torch.eye(2) + torch.diag(torch.tensor([6.0, 9.0])))
    torch.testing.assert_close(out["b"], torch.tensor([2.0, 0.0]))  # W_avg
    # full rank: the centred vectors sum to zero, so W = W_avg on every tensor
    full = mergebench.merge("cart", pre, finetuned, rank_ratio=1.0, progress=False).state_dict()
    torch.testing.assert_close(full["w"], torch.eye(2) + torch.diag(torch.tensor([2.0, 3.0])))


def test_two_tasks_give_the_average():
    # With N = 2 the centred vectors are opposite, so their truncations cancel.
    pre, finetuned = random_pool(seed=3, num_tasks=2)
    out = merge(pre, finetuned, rank_ratio=0.3, scaling=5.0).state_dict()
    for key in ("embed.weight", "layer.weight", "out.weight", "layer.bias"):
        average = (finetuned["task0"][key] + finetuned["task1"][key]) / 2
        torch.testing.assert_close(out[key], average, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tasks", [3, 4])
@pytest.mark.parametrize(("rank_ratio", "scaling"), [(0.12, 2.0), (0.5, 1.3), (1.0, 2.0)])
def test_matches_the_float64_reference(num_tasks, rank_ratio, scaling):
    pre, finetuned = random_pool(seed=num_tasks, num_tasks=num_tasks)
    result = merge(pre, finetuned, rank_ratio=rank_ratio, scaling=scaling)
    expected = merge_cart(pre, finetuned, [HEAD], rank_ratio=rank_ratio, scaling=scaling)
    out = result.state_dict()
    assert set(out) == set(expected) | {"head.weight"}
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value, atol=2e-5, rtol=1e-5, msg=key)
    assert torch.equal(out["position_ids"], pre["position_ids"])
    for task in finetuned:
        assert torch.equal(result.state_dict(task)["head.weight"], finetuned[task]["head.weight"])
    for key in ("conv.weight", "layer.bias"):  # non-matrix: W_avg, whatever the scaling
        average = sum(ft[key] for ft in finetuned.values()) / num_tasks
        torch.testing.assert_close(out[key], average, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", [1, 2])
def test_reference_does_not_depend_on_singular_vector_signs(seed):
    pre, finetuned = random_pool(seed=7)
    plain = merge_cart(pre, finetuned, [HEAD], rank_ratio=0.4)
    flipped = merge_cart(pre, finetuned, [HEAD], rank_ratio=0.4, sign_seed=seed)
    for key in plain:
        torch.testing.assert_close(plain[key], flipped[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_method_does_not_depend_on_singular_vector_signs(monkeypatch, seed):
    g = torch.Generator().manual_seed(11)
    stacks = [torch.randn(3, 7, 5, generator=g), torch.randn(4, 4, 9, generator=g)]
    plain = [cart_delta(s, 0.5, 2.0) for s in stacks]
    gen = torch.Generator().manual_seed(seed)

    def flipping_svd(x):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        flips = torch.where(torch.rand(s.shape[0], generator=gen) < 0.5, -1.0, 1.0)
        return u * flips, s, vh * flips[:, None]

    monkeypatch.setattr(svd_utils, "svd", flipping_svd)  # used by `truncate`
    for stack, expected in zip(stacks, plain, strict=True):
        torch.testing.assert_close(cart_delta(stack, 0.5, 2.0), expected, atol=1e-5, rtol=1e-5)
    assert cart.truncate is svd_utils.truncate


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    pre, finetuned = random_pool(seed=4)
    cpu = merge(pre, finetuned).state_dict()
    gpu = mergebench.merge(
        "cart", pre, finetuned, exclude=[HEAD], device="cuda", progress=False
    ).state_dict()
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("params", "option"),
    [
        ({"rank_ratio": 0.0}, "cart.rank_ratio"),
        ({"rank_ratio": 1.5}, "cart.rank_ratio"),
        ({"rank_ratio": -0.1}, "cart.rank_ratio"),
        ({"rank_ratio": float("nan")}, "cart.rank_ratio"),
        ({"scaling": float("inf")}, "cart.scaling"),
        ({"scaling": float("nan")}, "cart.scaling"),
        ({"scaling": "two"}, "cart.scaling"),
    ],
)
def test_rejects_bad_options(params, option):
    pre, finetuned = random_pool()
    with pytest.raises(MergeBenchError, match=option.replace(".", r"\.")):
        merge(pre, finetuned, **params)
