"""DELLA-Merging (methods.md): keep probabilities, elect with zero sum = +, disjoint mean,
seeding, keep rate, and the in-memory reference."""

from __future__ import annotations

import math

import pytest
import torch

import mergebench
from mergebench.methods.della import keep_probabilities
from mergebench.reference.della import della_reference
from mergebench.util.errors import MergeBenchError


def merge(pre, finetuned, **params):
    return mergebench.merge("della", pre, finetuned, progress=False, **params).state_dict()


def test_keep_probabilities_grow_with_the_rank_of_abs_tau():
    # density 0.5, window 0.4: q runs from 0.3 (smallest |tau|) to 0.7 in steps of 0.1.
    row = torch.tensor([0.3, -0.1, 0.2, 0.4, -0.5])
    q = keep_probabilities(row, density=0.5, window=0.4)
    expected = torch.tensor([0.5, 0.3, 0.4, 0.6, 0.7])
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-7)
    # Equal |tau|: ranks are stable (lower index first, lower rank).
    q = keep_probabilities(torch.tensor([1.0, -1.0, 1.0]), density=0.5, window=0.2)
    torch.testing.assert_close(q, torch.tensor([0.4, 0.5, 0.6]), rtol=0, atol=1e-7)


def test_rows_are_the_first_dimension_and_one_entry_gets_density():
    # Shape (2, 1, 2): rows of 2 entries (shape[0] rows); q = 0.4 and 0.6 in each row.
    tau = torch.tensor([[[5.0, 1.0]], [[-1.0, 2.0]]])
    q = keep_probabilities(tau, density=0.5, window=0.2)
    torch.testing.assert_close(q, torch.tensor([[[0.6, 0.4]], [[0.4, 0.6]]]), rtol=0, atol=1e-7)
    # Rows of one entry (shape (3, 1)) and 0-D tensors: q = density.
    assert torch.equal(keep_probabilities(torch.ones(3, 1), 0.7, 0.14), torch.full((3, 1), 0.7))
    assert torch.equal(keep_probabilities(torch.tensor(2.0), 0.7, 0.14), torch.tensor(0.7))


def test_elect_with_zero_sum_positive_and_disjoint_mean():
    # density 1, window 0: q = 1 everywhere, so nothing is dropped (no randomness).
    pre = {"w": torch.full((5,), 1.0)}
    taus = {
        "t1": [1.0, -2.0, 3.0, 0.0, 2.0],
        "t2": [-1.0, -1.0, 1.0, 0.0, -2.0],
        "t3": [2.0, 4.0, -5.0, 0.0, 0.0],
    }
    finetuned = {t: {"w": pre["w"] + torch.tensor(v)} for t, v in taus.items()}
    # sums [2, 1, -1, 0, 0] -> gamma [+, +, -, +, +] (a zero sum elects +, unlike TIES)
    # entry 0: t1 1, t3 2 agree -> 1.5;  entry 1: t3 4;  entry 2: t3 -5;  entry 3: none -> 0;
    # entry 4: t1 +2 and t2 -2 sum to 0 -> + -> t1 alone -> 2 (TIES would give -2).
    out = merge(pre, finetuned, density=1.0, window=0.0, scaling=0.5)["w"]
    assert torch.equal(out, 1.0 + 0.5 * torch.tensor([1.5, 4.0, -5.0, 0.0, 2.0]))


def test_kept_entries_are_divided_by_q_unless_rescale_is_off():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(2000, generator=g)
    pre, finetuned = {"w": torch.zeros(2000)}, {"a": {"w": tau}}
    # window 0: q = 0.5 for every entry, so each entry is 0 or 2 * tau (or tau).
    scaled = merge(pre, finetuned, density=0.5, window=0.0)["w"]
    plain = merge(pre, finetuned, density=0.5, window=0.0, rescale=False)["w"]
    kept = scaled != 0
    assert torch.equal(plain != 0, kept)  # the same draws (same seed)
    assert torch.equal(scaled[kept], tau[kept] * 2)
    assert torch.equal(plain[kept], tau[kept])
    assert 0.45 < kept.float().mean().item() < 0.55


def big_pool(n=200_000, tasks="abc"):
    g = torch.Generator().manual_seed(5)
    pre = {"w": torch.zeros(n), "v": torch.zeros(50, 40)}
    finetuned = {t: {k: torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in tasks}
    return pre, finetuned


def test_reproducible_by_seed_and_different_seeds_differ():
    pre, finetuned = big_pool(20_000)
    first = merge(pre, finetuned, seed=3)
    again = merge(pre, finetuned, seed=3)
    other = merge(pre, finetuned, seed=4)
    for key in pre:
        assert torch.equal(first[key], again[key])
        assert not torch.equal(first[key], other[key])


def test_empirical_keep_rate_is_density_and_rises_with_magnitude():
    pre, finetuned = big_pool(200_000, tasks="a")
    out = merge(pre, finetuned, rescale=False)["w"]  # density 0.7, window 0.14
    tau = finetuned["a"]["w"]
    kept = out != 0
    # Binomial standard error sqrt(0.21 / 2e5) ~ 0.001: 0.005 is five of them.
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    # The smallest tenth of |tau| has q in [0.63, 0.644], the largest tenth [0.756, 0.77].
    order = tau.abs().argsort()
    tenth = len(order) // 10
    low = kept[order[:tenth]].float().mean().item()
    high = kept[order[-tenth:]].float().mean().item()
    assert abs(low - 0.637) < 0.01
    assert abs(high - 0.763) < 0.01
    assert torch.equal(out[kept], tau[kept])


@pytest.fixture(scope="module")
def random_pool():
    g = torch.Generator().manual_seed(2)
    pre = {
        "embed.weight": torch.randn(30, 50, generator=g),
        "conv.weight": torch.randn(6, 2, 3, 3, generator=g),
        "norm.weight": torch.ones(50),
        "one.weight": torch.randn(7, 1, generator=g),  # rows of one entry
        "scale": torch.tensor(0.5),
        "half.weight": torch.randn(10, 20, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(5),
        "head.weight": torch.randn(3, 50, generator=g),
    }
    finetuned = {}
    for task in ("a", "b", "c"):
        ft = {}
        for key, value in pre.items():
            if value.is_floating_point():
                step = torch.randint(-3, 4, value.shape, generator=g).float() * 0.25
                ft[key] = (value.float() + step).to(value.dtype)
            else:
                ft[key] = value.clone()
        finetuned[task] = ft
    return pre, finetuned


@pytest.mark.parametrize(
    "params",
    [{}, {"density": 0.4, "window": 0.3, "scaling": 0.8, "seed": 9}, {"rescale": False}],
)
def test_streamed_merge_is_bit_identical_to_the_reference(random_pool, params):
    pre, finetuned = random_pool
    exclude = [r"head\..*"]
    out = mergebench.merge(
        "della", pre, finetuned, exclude=exclude, progress=False, **params
    ).state_dict("b")
    expected = della_reference(pre, finetuned, exclude=exclude, **params)
    assert len(expected) == 6
    for key, value in expected.items():
        assert out[key].dtype == pre[key].dtype
        assert torch.equal(out[key], value), key
    assert torch.equal(out["head.weight"], finetuned["b"]["head.weight"])


@pytest.mark.parametrize(
    ("option", "value", "extra"),
    [
        ("density", 0.0, {}),
        ("density", 1.2, {}),
        ("density", math.nan, {}),
        ("window", 0.3, {"density": 0.1}),  # density - window/2 < 0
        ("window", 0.2, {"density": 0.1}),  # density - window/2 = 0: q would be 0
        ("window", 0.3, {"density": 0.9}),  # density + window/2 > 1
        ("window", -0.1, {}),
        ("window", math.inf, {}),
        ("scaling", math.nan, {}),
        ("rescale", "yes", {}),
        ("seed", -1, {}),
        ("seed", 1.5, {}),
        ("seed", True, {}),
    ],
)
def test_bad_options_are_errors_naming_the_option(option, value, extra):
    pre, finetuned = {"w": torch.zeros(3)}, {"a": {"w": torch.ones(3)}}
    with pytest.raises(MergeBenchError, match=f"della.{option}"):
        merge(pre, finetuned, **{option: value, **extra})


@pytest.mark.parametrize("block", [50, 700])
def test_blocks_of_rows_give_the_reference_bit_for_bit(random_pool, monkeypatch, block):
    """Each key is pruned and elected in blocks of rows (`BLOCK_NUMEL`), every task's
    generator drawn block after block: the same bits as whole keys."""
    import mergebench.methods.della as della

    monkeypatch.setattr(della, "BLOCK_NUMEL", block)
    pre, finetuned = random_pool
    params = {"density": 0.4, "window": 0.3, "scaling": 0.8, "seed": 9}
    out = mergebench.merge(
        "della", pre, finetuned, exclude=[r"head\..*"], progress=False, **params
    ).state_dict("b")
    expected = della_reference(pre, finetuned, exclude=[r"head\..*"], **params)
    for key, value in expected.items():
        assert torch.equal(out[key], value), key


@pytest.mark.parametrize(("block", "reuse"), [(1 << 20, 16), (50, 40), (7, 200)])
def test_stream_row_blocks_give_the_reference_bit_for_bit(monkeypatch, block, reuse):
    """Big keys come from the stream as blocks of whole first-axis rows (DELLA's rows), down
    to one row a block: each block's draws start where the whole key's would."""
    import mergebench.engine.stream as stream_module
    import mergebench.methods.della as della

    monkeypatch.setattr(della, "BLOCK_NUMEL", block)
    monkeypatch.setattr(stream_module, "REUSE_MAX_NUMEL", reuse)
    g = torch.Generator().manual_seed(4)
    pre = {
        "embed.weight": torch.randn(24, 16, generator=g),  # 1-row blocks when reuse is 16
        "cube.weight": torch.randn(9, 4, 8, generator=g),
        "conv.weight": torch.randn(6, 2, 3, 3, generator=g),
        "wide.weight": torch.randn(30, 56, generator=g).to(torch.bfloat16),
        "norm.weight": torch.ones(40),
    }
    finetuned = {
        t: {k: (v.float() + torch.randint(-3, 4, v.shape, generator=g) * 0.25).to(v.dtype)
            for k, v in pre.items()}
        for t in "abc"
    }  # fmt: skip
    params = {"density": 0.4, "window": 0.3, "scaling": 0.8, "seed": 9}
    out = mergebench.merge("della", pre, finetuned, progress=False, **params).state_dict()
    expected = della_reference(pre, finetuned, **params)
    for key, value in expected.items():
        assert torch.equal(out[key], value), key


def test_a_block_with_its_offset_is_the_same_rows_of_the_whole_key():
    from mergebench.methods.della import della_delta

    g = torch.Generator().manual_seed(8)
    taus = torch.randint(-2, 3, (3, 10, 6), generator=g).float()
    whole = della_delta(taus, 5, 0.5, 0.4, True, 1.0, 3)
    for start, stop in [(0, 1), (1, 4), (4, 10), (9, 10)]:
        block = della_delta(taus[:, start:stop].contiguous(), 5, 0.5, 0.4, True, 1.0, 3,
                            offset=start * 6)  # fmt: skip
        assert torch.equal(block, whole[start:stop]), (start, stop)
