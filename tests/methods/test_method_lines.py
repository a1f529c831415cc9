"""LiNeS (methods.md): `W = W_pre + lambda(l) * tau_MTL`, `lambda(l) = alpha + beta * l / (L-1)`,
alpha = 1/N for task arithmetic, keys outside blocks, layer patterns, the reference."""

from __future__ import annotations

import math

import pytest
import torch

import mergebench
from mergebench.engine.pool import ModelPool
from mergebench.methods.base import RunContext
from mergebench.methods.lines import LiNeS
from mergebench.reference.lines import lines_reference
from mergebench.util.errors import MergeBenchError

QUIET = RunContext(progress=False)

KEYS = ["embed.weight", "layers.0.w", "layers.1.w", "layers.2.w", "layers.2.b", "norm.w"]
PATTERN = r"layers\.(\d+)\."


def hand_pool():
    pre = {k: torch.ones(2) for k in KEYS}
    finetuned = {
        "t1": {k: torch.tensor([2.0, -1.0]) for k in KEYS},  # tau [1, -2]
        "t2": {k: torch.tensor([4.0, 3.0]) for k in KEYS},  # tau [3, 2]
    }
    return pre, finetuned  # sum of task vectors [4, 0]


def test_task_arithmetic_layer_scaling_by_hand():
    pre, finetuned = hand_pool()
    out = mergebench.merge(
        "lines", pre, finetuned, layer_pattern=PATTERN, progress=False
    ).state_dict()
    # alpha = 1/2, L = 3, beta 0.5: lambda(0) = 0.5, lambda(1) = 0.75, lambda(2) = 1.0;
    # embed.weight and norm.w are outside every block: alpha.
    expected = {
        "embed.weight": [3.0, 1.0],
        "layers.0.w": [3.0, 1.0],
        "layers.1.w": [4.0, 1.0],
        "layers.2.w": [5.0, 1.0],
        "layers.2.b": [5.0, 1.0],
        "norm.w": [3.0, 1.0],
    }
    for key, value in expected.items():
        assert torch.equal(out[key], torch.tensor(value)), key
    # beta = 1: lambda(2) = 0.5 + 1 = 1.5
    out = mergebench.merge(
        "lines", pre, finetuned, layer_pattern=PATTERN, beta=1.0, progress=False
    ).state_dict()
    assert torch.equal(out["layers.2.w"], torch.tensor([7.0, 1.0]))
    assert torch.equal(out["layers.1.w"], torch.tensor([5.0, 1.0]))


def test_alpha_is_exactly_one_over_n_for_task_arithmetic():
    g = torch.Generator().manual_seed(1)
    pre = {"layers.0.w": torch.randn(30, generator=g), "layers.1.w": torch.randn(7, generator=g)}
    finetuned = {
        t: {k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in "abc"
    }
    method = LiNeS(base="task_arithmetic", beta=0.5, layer_pattern=PATTERN)
    out = method.merge(ModelPool.from_checkpoints(pre, finetuned), QUIET).state_dict()
    assert method.alpha == 1 / 3
    # Block 0 gets alpha: W_pre + (1/3) * sum_t tau_t.
    tau = torch.stack([ft["layers.0.w"] - pre["layers.0.w"] for ft in finetuned.values()])
    total = tau[0] + tau[1] + tau[2]
    assert torch.equal(out["layers.0.w"], pre["layers.0.w"] + (1 / 3) * total)


def test_single_block_gets_alpha_and_consensus_alpha_by_hand():
    # Two tasks, tau_1 [1, 0, 2, -1], tau_2 [1, 3, -1, 1]: sum [2, 3, 1, 0].
    # Consensus (threshold 0.6, k 2): masks [T, F, T, T] and [T, T, F, T] -> c [1, 0, 0, 1]
    # -> tau_MTL = [2, 0, 0, 0]; alpha = ||sum||_1 / (2 ||tau_MTL||_1) = 6 / 4 = 1.5.
    # One block (L = 1): lambda = alpha.
    pre = {"h.0.w": torch.zeros(4)}
    finetuned = {
        "t1": {"h.0.w": torch.tensor([1.0, 0.0, 2.0, -1.0])},
        "t2": {"h.0.w": torch.tensor([1.0, 3.0, -1.0, 1.0])},
    }
    method = LiNeS(base="consensus", beta=0.5, layer_pattern=r"h\.(\d+)\.")
    out = method.merge(ModelPool.from_checkpoints(pre, finetuned), QUIET).state_dict()
    assert method.alpha == 1.5
    assert torch.equal(out["h.0.w"], torch.tensor([3.0, 0.0, 0.0, 0.0]))


def test_layer_pattern_null_takes_the_pools():
    pre, finetuned = hand_pool()
    pool = ModelPool.from_checkpoints(pre, finetuned)
    pool.layer_pattern = PATTERN
    out = mergebench.merge_pool("lines", pool, progress=False).state_dict()
    assert torch.equal(out["layers.2.w"], torch.tensor([5.0, 1.0]))
    # An explicit option wins over the pool's: one block (L = 1), every key gets alpha.
    out = mergebench.merge_pool(
        "lines", pool, layer_pattern=r"layers\.(0)\.", progress=False
    ).state_dict()
    assert torch.equal(out["layers.2.w"], torch.tensor([3.0, 1.0]))


def test_pattern_errors_name_the_option():
    pre, finetuned = hand_pool()

    def run(**params):
        return mergebench.merge("lines", pre, finetuned, progress=False, **params)

    with pytest.raises(MergeBenchError, match="lines.layer_pattern: .*blocks.*matches no"):
        run(layer_pattern=r"blocks\.(\d+)")  # matches no key: named in the error
    with pytest.raises(MergeBenchError, match="lines.layer_pattern: not set"):
        run()  # neither the option nor the pool gives one
    with pytest.raises(MergeBenchError, match="lines.layer_pattern.*one group"):
        run(layer_pattern=r"layers\.\d+\.")
    with pytest.raises(MergeBenchError, match="lines.layer_pattern.*invalid regex"):
        run(layer_pattern=r"layers\.(\d+")
    with pytest.raises(MergeBenchError, match="lines.layer_pattern.*not a block number"):
        run(layer_pattern=r"(\w+)\.w")


@pytest.fixture(scope="module")
def random_pool():
    g = torch.Generator().manual_seed(6)
    pre = {"embeddings.word.weight": torch.randn(50, 16, generator=g) * 0.02}
    for layer in range(4):
        pre[f"encoder.layer.{layer}.attn.weight"] = torch.randn(16, 16, generator=g) * 0.02
        pre[f"encoder.layer.{layer}.norm.bias"] = torch.zeros(16)
    pre["pooler.weight"] = torch.randn(16, 16, generator=g).to(torch.bfloat16)
    pre["position_ids"] = torch.arange(8)
    pre["head.weight"] = torch.randn(3, 16, generator=g)
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


@pytest.mark.parametrize("base", ["task_arithmetic", "ties", "consensus"])
def test_streamed_merge_equals_the_reference(random_pool, base):
    """task_arithmetic: bit-identical (alpha = 1/4 both ways). ties and consensus: alpha is a
    ratio of float64 sums the engine adds key by key and the reference over one flat vector,
    so alpha agrees to ~1e-15 and the weights to float32 rounding."""
    pre, finetuned = random_pool
    exclude = [r"head\..*"]
    pattern = r"encoder\.layer\.(\d+)\."
    method = LiNeS(base=base, beta=0.7, layer_pattern=pattern)
    pool = ModelPool.from_checkpoints(pre, finetuned, exclude=exclude)
    out = method.merge(pool, QUIET).state_dict("c")
    expected, alpha = lines_reference(pre, finetuned, pattern, exclude=exclude, base=base, beta=0.7)
    assert len(expected) == 10
    assert math.isclose(method.alpha, alpha, rel_tol=1e-12)
    for key, value in expected.items():
        assert out[key].dtype == pre[key].dtype
        if base == "task_arithmetic":
            assert alpha == 0.25
            assert torch.equal(out[key], value), key
        else:
            torch.testing.assert_close(out[key], value, rtol=1e-6, atol=1e-7)
    assert torch.equal(out["head.weight"], finetuned["c"]["head.weight"])
    if base != "task_arithmetic":
        assert method.alpha > 0.25  # trimming / consensus shrink ||tau_MTL||_1


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("beta", math.nan),
        ("beta", math.inf),
        ("beta", -0.1),
        ("beta", "x"),
        ("base", "emr"),
        ("layer_pattern", 3),
    ],
)
def test_bad_options_are_errors_naming_the_option(option, value):
    pre, finetuned = hand_pool()
    params = {"layer_pattern": PATTERN, option: value}
    with pytest.raises(MergeBenchError, match=f"lines.{option}"):
        mergebench.merge("lines", pre, finetuned, progress=False, **params)
