"""TSV-M (methods.md, "TSV-M"): hand-computed cases, the float64 reference, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import svd_pools
import torch

import mergebench
from mergebench.methods import svd_utils, tsv
from mergebench.methods.tsv import tsv_block_size, tsv_delta
from mergebench.reference.tsv import merge_tsv, polar64
from mergebench.util.errors import MergeBenchError

HEAD = r"head\..*"


SHAPES = {
    "embed.weight": (10, 4),
    "layer.weight": (6, 6),
    "layer.bias": (6,),
    "out.weight": (4, 9),
    "conv.weight": (3, 2, 2, 2),
    "position_ids": (5,),
    "head.weight": (2, 4),
}


def random_pool(seed: int = 0, num_tasks: int = 3, scale: float = 0.1):
    """Matrices (square, tall, wide), 1-D and 4-D tensors, an integer buffer and a head
    that is task-specific (its shape differs per task)."""
    return svd_pools.random_pool(SHAPES, seed, num_tasks, scale)


def merge(pre, finetuned, **params):
    return mergebench.merge("tsv", pre, finetuned, exclude=[HEAD], progress=False, **params)


def merge_plain(pre, finetuned, **params):
    """Merge without an `exclude` (a pattern matching no key is an error)."""
    return mergebench.merge("tsv", pre, finetuned, progress=False, **params)


def matrix_pool(taus: list[torch.Tensor], key: str = "w"):
    pre = {key: torch.zeros(taus[0].shape)}
    return pre, {f"t{i}": {key: tau} for i, tau in enumerate(taus)}


@pytest.mark.parametrize(
    ("r", "n", "k"), [(768, 8, 96), (768, 3, 256), (5, 2, 2), (7, 7, 1), (2, 3, 0)]
)
def test_block_size_is_floor_of_rank_over_tasks(r, n, k):
    assert tsv_block_size(r, n) == k


def test_orthogonalisation_by_hand():
    # tau_1 = 4 e1 e1^T, tau_2 = 2 w w^T with w at 30 degrees: k = 1 per task, so
    # U = V = [e1, w]. Its polar factor has orthonormal columns placed symmetrically about
    # the columns' mean angle 15 degrees: a at -30 degrees, b at 60 degrees.
    w = torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)])
    taus = [
        4 * torch.outer(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])),
        2 * torch.outer(w, w),
    ]
    # delta = 4 a a^T + 2 b b^T
    s3 = math.sqrt(3)
    expected = torch.tensor([[3.5, -s3 / 2], [-s3 / 2, 2.5]])
    out = merge_plain(*matrix_pool(taus)).state_dict()["w"]
    torch.testing.assert_close(out, expected)


def test_rank_not_divisible_by_tasks_leaves_the_last_block_empty():
    # 3 x 3, N = 2: k = 1, blocks [0, 1) and [1, 2); column 2 stays zero (s = 0 there).
    tau1 = torch.diag(torch.tensor([3.0, 1.0, 0.5]))  # top triplet: 3, e1, e1
    tau2 = torch.zeros(3, 3)
    tau2[1, 2] = -2.0  # top triplet: 2, e2, -e3 (or -e2, e3)
    tau2[0, 0] = 0.25  # second triplet, dropped
    out = merge_plain(*matrix_pool([tau1, tau2])).state_dict()["w"]
    expected = torch.zeros(3, 3)
    expected[0, 0], expected[1, 2] = 3.0, -2.0
    torch.testing.assert_close(out, expected)


def test_k_zero_gives_no_change_on_matrices_but_the_mean_elsewhere():
    # 2 x 5 matrices, N = 3 > r = 2: k = 0, delta = 0; the 1-D tensor gets the mean.
    g = torch.Generator().manual_seed(1)
    pre = {"m.weight": torch.randn(2, 5, generator=g), "b": torch.randn(4, generator=g)}
    finetuned = {
        t: {k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in "abc"
    }
    out = mergebench.merge("tsv", pre, finetuned, scaling=0.5, progress=False).state_dict()
    torch.testing.assert_close(out["m.weight"], pre["m.weight"])
    mean = sum(ft["b"] - pre["b"] for ft in finetuned.values()) / 3
    torch.testing.assert_close(out["b"], pre["b"] + 0.5 * mean)


@pytest.mark.parametrize("num_tasks", [2, 3, 4])
@pytest.mark.parametrize("scaling", [1.0, 0.3])
def test_matches_the_float64_reference(num_tasks, scaling):
    pre, finetuned = random_pool(seed=num_tasks, num_tasks=num_tasks)
    result = merge(pre, finetuned, scaling=scaling)
    expected = merge_tsv(pre, finetuned, exclude=[HEAD], scaling=scaling)
    out = result.state_dict()
    assert set(out) == set(expected) | {"head.weight"}
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value, atol=2e-5, rtol=1e-5, msg=key)
    assert torch.equal(out["position_ids"], pre["position_ids"])
    for t, task in enumerate(finetuned):  # heads stay task-specific
        assert result.state_dict(task)["head.weight"].shape == (2 + t, 4)
        assert torch.equal(result.state_dict(task)["head.weight"], finetuned[task]["head.weight"])
    # the 4-D and 1-D tensors are the scaled mean of the task vectors
    for key in ("conv.weight", "layer.bias"):
        mean = sum(ft[key] - pre[key] for ft in finetuned.values()) / num_tasks
        torch.testing.assert_close(out[key], pre[key] + scaling * mean)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reference_does_not_depend_on_singular_vector_signs(seed):
    pre, finetuned = random_pool(seed=7)
    plain = merge_tsv(pre, finetuned, exclude=[HEAD])
    flipped = merge_tsv(pre, finetuned, exclude=[HEAD], sign_seed=seed)
    for key in plain:
        torch.testing.assert_close(plain[key], flipped[key], atol=1e-6, rtol=1e-6)


def flipping_svd(seed: int):
    g = torch.Generator().manual_seed(seed)

    def svd(x):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        flips = torch.where(torch.rand(s.shape[0], generator=g) < 0.5, -1.0, 1.0).to(x.dtype)
        return u * flips, s, vh * flips[:, None]

    return svd


@pytest.mark.parametrize("seed", [0, 1])
def test_method_does_not_depend_on_singular_vector_signs(monkeypatch, seed):
    g = torch.Generator().manual_seed(11)
    stacks = [torch.randn(3, 7, 5, generator=g), torch.randn(2, 4, 9, generator=g)]
    plain = [tsv_delta(s) for s in stacks]
    monkeypatch.setattr(svd_utils, "svd", flipping_svd(seed))  # also inside `polar`
    monkeypatch.setattr(tsv, "svd", flipping_svd(seed + 10))
    for stack, expected in zip(stacks, plain, strict=True):
        torch.testing.assert_close(tsv_delta(stack), expected, atol=1e-5, rtol=1e-5)


def test_polar_factor_helpers_agree():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    p = svd_utils.polar(x)
    torch.testing.assert_close(p.T @ p, torch.eye(4, dtype=torch.float64))
    np.testing.assert_allclose(p.numpy(), polar64(x.numpy()), atol=1e-12)


def test_svd_falls_back_to_float64_when_float32_fails(monkeypatch):
    real = torch.linalg.svd
    calls = []

    def flaky(x, full_matrices=True):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("svd: the algorithm failed to converge")
        return real(x, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    x = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    u, s, vh = svd_utils.svd(x)
    assert calls == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([3.0, 2.0]))
    torch.testing.assert_close((u * s) @ vh, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    pre, finetuned = random_pool(seed=4)
    cpu = merge(pre, finetuned).state_dict()
    gpu = mergebench.merge(
        "tsv", pre, finetuned, exclude=[HEAD], device="cuda", progress=False
    ).state_dict()
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "big", None])
def test_rejects_bad_scaling(value):
    pre, finetuned = random_pool()
    with pytest.raises(MergeBenchError, match=r"tsv\.scaling"):
        merge(pre, finetuned, scaling=value)


def test_one_task_gives_its_task_vector_back():
    # N = 1: k = r, U and V^T are already orthonormal, so delta = U_1 diag(s_1) V_1^T = tau.
    pre, finetuned = random_pool(seed=8, num_tasks=1)
    out = merge(pre, finetuned).state_dict()
    for key in ("embed.weight", "layer.weight", "out.weight", "conv.weight", "layer.bias"):
        torch.testing.assert_close(out[key], finetuned["task0"][key], atol=1e-5, rtol=1e-5)


def test_bfloat16_models_are_merged_in_float32_and_cast_back():
    pre, finetuned = random_pool(seed=9)
    to_bf16 = lambda sd: {k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    pre = to_bf16(pre)
    finetuned = {t: to_bf16(ft) for t, ft in finetuned.items()}
    out = merge(pre, finetuned).state_dict()
    expected = merge_tsv(pre, finetuned, exclude=[HEAD])
    for key, value in expected.items():
        assert out[key].dtype == value.dtype == pre[key].dtype
        torch.testing.assert_close(out[key].float(), value.float(), atol=2e-2, rtol=1e-2)
