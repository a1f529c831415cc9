"""Iso-C and Iso-CTS (methods.md, "Iso-C and Iso-CTS"): hand-computed cases, the float64
references, edge cases."""

from __future__ import annotations

import pytest
import svd_pools
import torch

import mergebench
from mergebench.methods import iso_c, iso_cts, svd_utils
from mergebench.methods.iso_c import iso_c_delta
from mergebench.methods.iso_cts import iso_cts_delta, iso_cts_sizes
from mergebench.reference.iso import iso_cts_split, merge_iso_c, merge_iso_cts
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


def merge(method, pre, finetuned, **params):
    return mergebench.merge(method, pre, finetuned, exclude=[HEAD], progress=False, **params)


def merge_plain(method, pre, finetuned, **params):
    """Merge without an `exclude` (a pattern matching no key is an error)."""
    return mergebench.merge(method, pre, finetuned, progress=False, **params)


def matrix_pool(taus: list[torch.Tensor], key: str = "w"):
    pre = {key: torch.zeros(taus[0].shape)}
    return pre, {f"t{i}": {key: tau} for i, tau in enumerate(taus)}


def check_against(out, expected, pre, finetuned, result):
    assert set(out) == set(expected) | {"head.weight"}
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value, atol=2e-5, rtol=1e-5, msg=key)
    assert torch.equal(out["position_ids"], pre["position_ids"])
    for task in finetuned:
        assert torch.equal(result.state_dict(task)["head.weight"], finetuned[task]["head.weight"])


# --- Iso-C ---------------------------------------------------------------------------------
def test_iso_c_flattens_the_spectrum_of_the_task_sum():
    # S = diag(3, 1): mean(s) = 2, U V^T = I.
    out = merge_plain("iso_c", *matrix_pool([torch.diag(torch.tensor([1.0, 1.0])),
                                        torch.diag(torch.tensor([2.0, 0.0]))]))  # fmt: skip
    torch.testing.assert_close(out.state_dict()["w"], 2 * torch.eye(2))


def test_iso_c_means_over_min_m_n_singular_values():
    # S (3 x 2) = [[3, 0], [0, 1], [0, 0]]: s = (3, 1), mean over min(m, n) = 2 values.
    s = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    out = merge_plain("iso_c", *matrix_pool([s / 2, s / 2]), scaling=0.5).state_dict()["w"]
    torch.testing.assert_close(out, 0.5 * 2 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))


def test_iso_c_keeps_the_orientation_of_the_sum():
    # S = [[0, -2], [1, 0]]: s = (2, 1), U V^T = [[0, -1], [1, 0]] (a rotation).
    s = torch.tensor([[0.0, -2.0], [1.0, 0.0]])
    out = merge_plain("iso_c", *matrix_pool([s, torch.zeros(2, 2)])).state_dict()["w"]
    torch.testing.assert_close(out, 1.5 * torch.tensor([[0.0, -1.0], [1.0, 0.0]]))


@pytest.mark.parametrize("num_tasks", [2, 4])
@pytest.mark.parametrize("scaling", [1.0, 0.7])
def test_iso_c_matches_the_float64_reference(num_tasks, scaling):
    pre, finetuned = random_pool(seed=num_tasks, num_tasks=num_tasks)
    result = merge("iso_c", pre, finetuned, scaling=scaling)
    expected = merge_iso_c(pre, finetuned, exclude=[HEAD], scaling=scaling)
    check_against(result.state_dict(), expected, pre, finetuned, result)
    for key in ("conv.weight", "layer.bias"):  # non-matrix: the scaled mean
        mean = sum(ft[key] - pre[key] for ft in finetuned.values()) / num_tasks
        torch.testing.assert_close(result.state_dict()[key], pre[key] + scaling * mean)


# --- Iso-CTS -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("r", "n", "fraction", "k_c", "n_t"),
    [
        (768, 8, 0.8, 616, 19),  # k0 = 614, 154 / 8 = 19.25 -> 19
        (10, 4, 0.8, 10, 0),  # k0 = 8, 2 / 4 = 0.5 -> 0 (half to even)
        (10, 4, 0.4, 2, 2),  # k0 = 4, 6 / 4 = 1.5 -> 2 (half to even)
        (10, 4, 0.6, 6, 1),  # k0 = 6, 4 / 4 = 1
        (5, 2, 0.0, 1, 2),  # 5 / 2 = 2.5 -> 2
        (7, 2, 0.0, 1, 3),  # 7 / 2 = 3.5 -> 4: t_tot = 8 > 7, capped to 6
        (3, 4, 0.0, 3, 0),  # 3 / 4 -> 1: t_tot = 4 > 3, capped to 0
        (6, 3, 1.0, 6, 0),  # everything common: Iso-C
        (6, 3, 0.0, 0, 2),  # nothing common
    ],
)
def test_iso_cts_subspace_sizes(r, n, fraction, k_c, n_t):
    assert iso_cts_sizes(r, n, fraction) == (k_c, n_t)
    assert iso_cts_split(r, n, fraction) == (k_c, n_t)


def test_iso_cts_by_hand():
    # 4 x 4, N = 2, common_fraction 0.5: k0 = 2, t_tot = 2, k_c = 2, n_t = 1.
    tau1 = torch.diag(torch.tensor([4.0, 0.0, 2.0, 1.0]))
    tau2 = torch.diag(torch.tensor([0.0, -3.0, 0.0, 0.5]))
    # S = diag(4, -3, 2, 1.5): common = e1 (4), e2 (3, sign -).
    # R_1 = diag(0, 0, 2, 1) -> top: 2 on e3; R_2 = diag(0, 0, 0, 0.5) -> 0.5 on e4.
    # Stacked s = (2, 0.5, 4, 3), mean 2.375; U_perp V_perp^T = diag(1, -1, 1, 1).
    out = merge_plain("iso_cts", *matrix_pool([tau1, tau2]), common_fraction=0.5).state_dict()["w"]
    torch.testing.assert_close(out, 2.375 * torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0])))
    # Iso-C on the same sum: mean(4, 3, 2, 1.5) = 2.625.
    iso = merge_plain("iso_c", *matrix_pool([tau1, tau2])).state_dict()["w"]
    torch.testing.assert_close(iso, 2.625 * torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0])))


def test_iso_cts_with_everything_common_is_iso_c():
    g = torch.Generator().manual_seed(2)
    stack = torch.randn(3, 7, 5, generator=g)
    torch.testing.assert_close(iso_cts_delta(stack, 1.0), iso_c_delta(stack), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tasks", [2, 3, 4])
@pytest.mark.parametrize("common_fraction", [0.8, 0.5, 0.0, 1.0])
def test_iso_cts_matches_the_float64_reference(num_tasks, common_fraction):
    # r = 4, 5, 6 with N = 2, 3, 4: N does not divide the rank in most cases.
    pre, finetuned = random_pool(seed=10 + num_tasks, num_tasks=num_tasks)
    result = merge("iso_cts", pre, finetuned, common_fraction=common_fraction, scaling=0.9)
    expected = merge_iso_cts(
        pre, finetuned, exclude=[HEAD], common_fraction=common_fraction, scaling=0.9
    )
    check_against(result.state_dict(), expected, pre, finetuned, result)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_iso_cts_reference_does_not_depend_on_singular_vector_signs(seed):
    pre, finetuned = random_pool(seed=7)
    plain = merge_iso_cts(pre, finetuned, exclude=[HEAD], common_fraction=0.5)
    flipped = merge_iso_cts(pre, finetuned, exclude=[HEAD], common_fraction=0.5, sign_seed=seed)
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
def test_methods_do_not_depend_on_singular_vector_signs(monkeypatch, seed):
    g = torch.Generator().manual_seed(11)
    stacks = [torch.randn(3, 7, 5, generator=g), torch.randn(2, 4, 9, generator=g)]
    plain_c = [iso_c_delta(s) for s in stacks]
    plain_cts = [iso_cts_delta(s, 0.5) for s in stacks]
    monkeypatch.setattr(svd_utils, "svd", flipping_svd(seed))  # inside `polar`
    monkeypatch.setattr(iso_c, "svd", flipping_svd(seed + 10))
    monkeypatch.setattr(iso_cts, "svd", flipping_svd(seed + 20))
    for stack, c, cts in zip(stacks, plain_c, plain_cts, strict=True):
        torch.testing.assert_close(iso_c_delta(stack), c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(iso_cts_delta(stack, 0.5), cts, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_cuda_matches_cpu(method):
    pre, finetuned = random_pool(seed=4)
    cpu = merge(method, pre, finetuned).state_dict()
    gpu = mergebench.merge(
        method, pre, finetuned, exclude=[HEAD], device="cuda", progress=False
    ).state_dict()
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "params", "option"),
    [
        ("iso_c", {"scaling": float("nan")}, "iso_c.scaling"),
        ("iso_c", {"scaling": float("-inf")}, "iso_c.scaling"),
        ("iso_c", {"scaling": "big"}, "iso_c.scaling"),
        ("iso_cts", {"scaling": float("inf")}, "iso_cts.scaling"),
        ("iso_cts", {"common_fraction": -0.1}, "iso_cts.common_fraction"),
        ("iso_cts", {"common_fraction": 1.5}, "iso_cts.common_fraction"),
        ("iso_cts", {"common_fraction": float("nan")}, "iso_cts.common_fraction"),
        ("iso_cts", {"common_fraction": "most"}, "iso_cts.common_fraction"),
    ],
)
def test_rejects_bad_options(method, params, option):
    pre, finetuned = random_pool()
    with pytest.raises(MergeBenchError, match=option.replace(".", r"\.")):
        merge(method, pre, finetuned, **params)
