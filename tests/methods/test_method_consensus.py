"""Consensus merging (methods.md): `W = W_pre + scaling * (c * tau_MTL)`, `c = sum_t m_t >= k`
with the TALL masks; k = 0 is the base, k > N is W_pre; the in-memory reference."""

from __future__ import annotations

import math

import pytest
import torch

import mergebench
from mergebench.reference.tall_masks import consensus_reference
from mergebench.util.errors import MergeBenchError

PRE = [0.5, 0.5, 0.5, 0.5]
TAUS = {"t1": [1.0, 0.0, 2.0, -1.0], "t2": [1.0, 3.0, -1.0, 1.0], "t3": [0.0, 1.0, 1.0, -2.0]}
# tau_MTL = sum = [2, 4, 2, -2]; threshold 0.5:
#   t1 |tau| [1, 0, 2, 1] > 0.5 * |sum - tau| = 0.5 * [1, 4, 0, 1] -> [T, F, T, T]
#   t2 |tau| [1, 3, 1, 1] > 0.5 * [1, 1, 3, 3]                     -> [T, T, F, F]
#   t3 |tau| [0, 1, 1, 2] > 0.5 * [2, 3, 1, 0]                     -> [F, F, T, T]
#   votes [2, 1, 2, 2]


def run(**params) -> torch.Tensor:
    pre = {"w": torch.tensor(PRE)}
    finetuned = {t: {"w": torch.tensor(PRE) + torch.tensor(v)} for t, v in TAUS.items()}
    result = mergebench.merge("consensus", pre, finetuned, progress=False, **params)
    return result.state_dict()["w"]


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (2, [1.5, 0.5, 1.5, -0.5]),  # c [1, 0, 1, 1]: 0.5 + 0.5 * [2, 0, 2, -2]
        (1, [1.5, 2.5, 1.5, -0.5]),  # c all ones: the scaled task sum
        (3, PRE),  # no entry has 3 votes
    ],
)
def test_consensus_by_hand(k, expected):
    assert torch.equal(run(threshold=0.5, k=k, scaling=0.5), torch.tensor(expected))


def test_per_task_threshold_mapping():
    # t3 at threshold 2: [0, 1, 1, 2] > 2 * [2, 3, 1, 0] = [4, 6, 2, 0] -> [F, F, F, T]
    # votes [2, 1, 1, 2] -> c [1, 0, 0, 1]
    out = run(threshold={"t1": 0.5, "t2": 0.5, "t3": 2.0}, k=2, scaling=0.5)
    assert torch.equal(out, torch.tensor([1.5, 0.5, 0.5, -0.5]))
    with pytest.raises(MergeBenchError, match="consensus.threshold.*lacks task 't3'"):
        run(threshold={"t1": 0.5, "t2": 0.5})


def test_defaults_are_threshold_0_6_k_2_scaling_0_3():
    # threshold 0.6: t1 [1,0,2,1] > [0.6, 2.4, 0, 0.6] -> [T, F, T, T];
    # t2 [1,3,1,1] > [0.6, 0.6, 1.8, 1.8] -> [T, T, F, F]; t3 [0,1,1,2] > [1.2, 1.8, 0.6, 0]
    # -> [F, F, T, T]: votes [2, 1, 2, 2] -> c [1, 0, 1, 1]
    expected = torch.tensor(PRE) + 0.3 * torch.tensor([2.0, 0.0, 2.0, -2.0])
    assert torch.equal(run(), expected)


@pytest.fixture(scope="module")
def random_pool():
    g = torch.Generator().manual_seed(8)
    pre = {
        "embed.weight": torch.randn(150, 100, generator=g) * 0.02,
        "block.weight": torch.randn(12, 20, generator=g),
        "block.bias": torch.zeros(20),
        "scale": torch.tensor(1.0),
        "half.weight": torch.randn(9, 11, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(6),
        "head.weight": torch.randn(3, 20, generator=g),
    }
    finetuned = {}
    for task in ("a", "b", "c", "d"):
        ft = {}
        for key, value in pre.items():
            if value.is_floating_point():
                step = torch.randint(-3, 4, value.shape, generator=g).float() * 1e-2
                ft[key] = (value.float() + step).to(value.dtype)
            else:
                ft[key] = value.clone()
        finetuned[task] = ft
    return pre, finetuned


def merged(pool, method, **params):
    pre, finetuned = pool
    return mergebench.merge(
        method, pre, finetuned, exclude=[r"head\..*"], progress=False, **params
    ).state_dict("a")


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"base": "ties", "k": 1, "scaling": 0.9},
        {"threshold": {"a": 0.2, "b": 0.3, "c": 0.5, "d": 0.6}, "k": 3},
    ],
)
def test_streamed_merge_equals_the_reference(random_pool, params):
    """torch.equal (+0 and -0 compare equal: the reference zeroes with `where`)."""
    pre, finetuned = random_pool
    out = merged(random_pool, "consensus", **params)
    expected = consensus_reference(pre, finetuned, exclude=[r"head\..*"], **params)
    assert len(expected) == 5
    for key, value in expected.items():
        assert out[key].dtype == pre[key].dtype
        assert torch.equal(out[key], value), key
    assert torch.equal(out["head.weight"], finetuned["a"]["head.weight"])


def test_k_zero_is_the_base_method(random_pool):
    plain = merged(random_pool, "consensus", k=0, scaling=0.4)
    base = merged(random_pool, "task_arithmetic", scaling=0.4)
    ties = merged(random_pool, "consensus", base="ties", k=0, scaling=0.4)
    ties_base = merged(
        random_pool, "ties", k=0.2, aggregate="sum", topk_scope="global", scaling=0.4
    )
    for key in plain:
        assert torch.equal(plain[key], base[key]), key
        assert torch.equal(ties[key], ties_base[key]), key


def test_k_above_the_number_of_tasks_gives_the_pretrained_model(random_pool):
    pre, _ = random_pool
    out = merged(random_pool, "consensus", k=5, threshold=0.0)  # 4 tasks
    for key, value in pre.items():
        if key != "head.weight":
            assert torch.equal(out[key], value), key


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("k", -1),
        ("k", 1.5),
        ("k", True),
        ("k", "two"),
        ("scaling", math.nan),
        ("scaling", math.inf),
        ("threshold", -1.0),
        ("threshold", math.nan),
        ("base", "dare"),
    ],
)
def test_bad_options_are_errors_naming_the_option(option, value):
    with pytest.raises(MergeBenchError, match=f"consensus.{option}"):
        run(**{option: value})
