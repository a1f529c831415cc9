"""SLERP (methods.md): hand-computed pairs, the thresholds, endpoints, the reference, errors."""

from __future__ import annotations

import math

import pytest
import torch

import mergebench
from mergebench.methods.slerp import (
    DOT_THRESHOLD,
    NORM_EPS,
    inverse_norm,
    slerp_coefficients,
)
from mergebench.reference.slerp import slerp_reference
from mergebench.util.errors import MergeBenchError


def slerp(a, b, pre=None, **params) -> torch.Tensor:
    a, b = torch.tensor(a), torch.tensor(b)
    pre = torch.zeros_like(a) if pre is None else torch.tensor(pre)
    finetuned = {"a": {"w": a}, "b": {"w": b}}
    return mergebench.merge("slerp", {"w": pre}, finetuned, progress=False, **params).state_dict()[
        "w"
    ]


def close(got: torch.Tensor, want: list[float]) -> None:
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)


def test_orthogonal_unit_vectors_follow_the_arc_and_t_runs_from_a_to_b():
    # theta = pi/2: W = sin((1-t) pi/2) A + sin(t pi/2) B (the chord midpoint would be 0.5).
    close(slerp([1.0, 0.0], [0.0, 1.0]), [math.sqrt(0.5), math.sqrt(0.5)])
    close(slerp([1.0, 0.0], [0.0, 1.0], t=0.25), [math.cos(math.pi / 8), math.sin(math.pi / 8)])
    close(slerp([1.0, 0.0], [0.0, 1.0], t=0.0), [1.0, 0.0])
    close(slerp([1.0, 0.0], [0.0, 1.0], t=1.0), [0.0, 1.0])


def test_the_coefficients_apply_to_the_models_not_the_normalized_vectors():
    # |A| = |B| = 5, d = 24/25: the arc midpoint has norm 5, W = 5/sqrt(2) * [1, 1]
    # (lerp: [3.5, 3.5]; without normalizing, d = 24 > 0.9995 would lerp too).
    close(slerp([3.0, 4.0], [4.0, 3.0]), [5 / math.sqrt(2), 5 / math.sqrt(2)])
    # Different norms: W = sin(pi/4) (A + B) on the models themselves.
    close(slerp([3.0, 0.0], [0.0, 4.0]), [3 * math.sqrt(0.5), 4 * math.sqrt(0.5)])


def test_an_obtuse_angle_keeps_its_sign():
    # d = -0.6: cos(theta/2) = sqrt(0.2), W = (A + B) / (2 sqrt(0.2)) = [0.4, 0.8] * 1.118...
    # (with d = +0.6 it would be [0.4, 0.8] * 0.559...).
    scale = 1 / (2 * math.sqrt(0.2))
    close(slerp([1.0, 0.0], [-0.6, 0.8]), [0.4 * scale, 0.8 * scale])


def test_nearly_antiparallel_pairs_lerp_like_nearly_parallel_ones():
    # d = -1/sqrt(1.0001) = -0.99995: |d| > 0.9995 -> (A + B) / 2 (slerp would scale by ~100).
    close(slerp([1.0, 0.0], [-1.0, 0.01]), [0.0, 0.005])
    # d = 0.99995 -> lerp at t = 0.3.
    close(slerp([1.0, 0.0], [1.0, 0.01], t=0.3), [1.0, 0.003])


def test_the_dot_threshold_is_strict():
    t = 0.3
    theta = math.acos(DOT_THRESHOLD)
    at = (math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta))
    assert slerp_coefficients(DOT_THRESHOLD, t) == at  # |d| = 0.9995 still slerps
    assert slerp_coefficients(-DOT_THRESHOLD, t)[0] != 1 - t
    above = math.nextafter(DOT_THRESHOLD, 2.0)
    assert slerp_coefficients(above, t) == (1 - t, t)
    assert slerp_coefficients(-above, t) == (1 - t, t)


def test_a_norm_at_or_below_1e_8_is_not_divided_by():
    assert inverse_norm(NORM_EPS) == 1.0
    assert inverse_norm(5e-9) == 1.0
    just_above = math.nextafter(NORM_EPS, 1.0)
    assert inverse_norm(just_above) == 1.0 / just_above
    # |A| = 5e-9 stays unnormalized: d = 5e-9 (not 1), theta ~ pi/2, W ~ sin(pi/4) (A + B)
    # where the colinear lerp would give 0.5 (A + B).
    got = slerp([5e-9, 0.0], [1.0, 0.0])
    theta = math.acos(5e-9)
    coef = math.sin(theta / 2) / math.sin(theta)
    close(got, [coef * (1 + 5e-9), 0.0])


def test_the_pretrained_model_is_not_an_endpoint():
    # Same A and B over another pretrained tensor: the same W.
    close(slerp([1.0, 0.0], [0.0, 1.0], pre=[7.0, -3.0]), [math.sqrt(0.5), math.sqrt(0.5)])


def test_endpoints_order_the_two_models():
    a, b = [2.0, 0.5, -1.0], [0.0, 1.0, 3.0]
    swapped = slerp(a, b, t=0.2, endpoints=["b", "a"])
    torch.testing.assert_close(swapped, slerp(a, b, t=0.8), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(swapped, slerp(a, b, t=0.2))


@pytest.fixture(scope="module")
def random_pool():
    g = torch.Generator().manual_seed(5)
    pre = {
        "embed.weight": torch.randn(30, 16, generator=g),
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "norm.weight": torch.ones(16),
        "scale": torch.tensor(0.5),
        "half.weight": torch.randn(12, 10, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(5),
        "head.weight": torch.randn(3, 16, generator=g),
    }
    finetuned = {}
    for task, size in (("x", 0.3), ("y", 2.0)):
        finetuned[task] = {
            k: (v.float() + size * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point()
            else v.clone()
            for k, v in pre.items()
        }
    # A colinear pair: lerp.
    finetuned["x"]["norm.weight"] = pre["norm.weight"] * 0.5
    finetuned["y"]["norm.weight"] = pre["norm.weight"] * 1.5
    return pre, finetuned


@pytest.mark.parametrize("params", [{}, {"t": 0.3}, {"t": 0.9, "endpoints": ["y", "x"]}])
def test_streamed_in_memory_and_reference_agree(random_pool, params, tmp_path):
    pre, finetuned = random_pool
    exclude = [r"head\..*"]
    in_memory = mergebench.merge(
        "slerp", pre, finetuned, exclude=exclude, progress=False, **params
    ).state_dict("x")
    streamed = mergebench.merge(
        "slerp", pre, finetuned, exclude=exclude, progress=False, output_dir=tmp_path / "out",
        shard_size=400, **params,
    ).state_dict("x")  # fmt: skip
    expected = slerp_reference(pre, finetuned, exclude=exclude, **params)
    assert set(expected) == {k for k in pre if pre[k].is_floating_point() and k != "head.weight"}
    for key, value in expected.items():
        assert torch.equal(in_memory[key], streamed[key]), key
        assert in_memory[key].dtype == pre[key].dtype
        # W_pre + (W - W_pre) against W: a few float32 ulps (bf16: one bf16 ulp at most).
        tol = {"rtol": 8e-3, "atol": 8e-3} if value.dtype == torch.bfloat16 else {}
        torch.testing.assert_close(in_memory[key].float(), value.float(), **tol)
    assert torch.equal(in_memory["head.weight"], finetuned["x"]["head.weight"])
    assert torch.equal(in_memory["position_ids"], pre["position_ids"])
    # The colinear key interpolates linearly: (1 - t) 0.5 + t 1.5 at the default t = 0.5.
    if not params:
        close(in_memory["norm.weight"], [1.0] * 16)


@pytest.mark.parametrize("tasks", [("a",), ("a", "b", "c")])
def test_anything_but_two_tasks_is_an_error(tasks):
    pre = {"w": torch.zeros(3)}
    finetuned = {t: {"w": torch.ones(3)} for t in tasks}
    message = f"slerp: merges exactly two fine-tuned models, got {len(tasks)} tasks"
    with pytest.raises(MergeBenchError, match=message):
        mergebench.merge("slerp", pre, finetuned, progress=False)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("t", math.nan, "slerp.t"),
        ("t", math.inf, "slerp.t"),
        ("t", "half", "slerp.t"),
        ("t", True, "slerp.t"),
        ("endpoints", "a", "slerp.endpoints"),
        ("endpoints", ["a"], "slerp.endpoints"),
        ("endpoints", ["a", "a"], "slerp.endpoints"),
        ("endpoints", ["a", 1], "slerp.endpoints"),
        ("endpoints", ["a", "c"], r"slerp.endpoints: 'c' is not a task of the pool"),
    ],
)
def test_bad_options_are_errors_naming_the_option(option, value, message):
    pre = {"w": torch.zeros(3)}
    finetuned = {"a": {"w": torch.ones(3)}, "b": {"w": -torch.ones(3)}}
    with pytest.raises(MergeBenchError, match=message):
        mergebench.merge("slerp", pre, finetuned, progress=False, **{option: value})
