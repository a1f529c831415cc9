"""Model Stock (methods.md): hand-computed ratios, rows, zero and cancelling offsets, the
reference, errors."""

from __future__ import annotations

import math

import pytest
import torch

import mergebench
from mergebench.reference.model_stock import model_stock_reference
from mergebench.util.errors import MergeBenchError


def stock(pre, offsets, **params) -> torch.Tensor:
    """Model Stock of `W_t = pre + offsets[t]` on one key `w`."""
    pre = torch.tensor(pre)
    finetuned = {f"t{i}": {"w": pre + torch.tensor(o)} for i, o in enumerate(offsets)}
    result = mergebench.merge("model_stock", {"w": pre}, finetuned, progress=False, **params)
    return result.state_dict()["w"]


def close(got: torch.Tensor, want) -> None:
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float32))


def ratio(n: int, c: float) -> float:
    return n * c / (1 + (n - 1) * c)


def test_two_models_at_45_degrees():
    # cos = 1/sqrt(2), t = 2c / (1 + c) = 0.8284...; mean offset [1, 0.5].
    t = ratio(2, math.sqrt(0.5))
    assert abs(t - 0.828427) < 1e-6
    close(stock([1.0, 2.0], [[1.0, 0.0], [1.0, 1.0]]), [1.0 + t, 2.0 + 0.5 * t])


def test_three_models_average_their_pairwise_cosines():
    # cos_12 = 0, cos_13 = cos_23 = 1/sqrt(2): c = sqrt(2)/3, t = 3c / (1 + 2c).
    t = ratio(3, 2 * math.sqrt(0.5) / 3)
    offsets = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    close(stock([0.0, 0.0, 5.0], offsets), [2 / 3 * t, 2 / 3 * t, 5.0])


def test_negative_correlation_gives_a_negative_ratio():
    # cos = -1/sqrt(2): t = 2c / (1 + c) = -4.83: the mean offset [0, 0.5] is pushed back.
    t = ratio(2, -math.sqrt(0.5))
    assert t < -4.8
    close(stock([0.0, 0.0], [[1.0, 0.0], [-1.0, 1.0]]), [0.0, 0.5 * t])


def test_aligned_models_give_their_average_and_orthogonal_ones_the_base():
    close(stock([1.0, 1.0], [[2.0, 4.0], [1.0, 2.0]]), [2.5, 4.0])  # c = 1: t = 1
    close(stock([1.0, 1.0], [[2.0, 0.0], [0.0, 3.0]]), [1.0, 1.0])  # c = 0: t = 0


def test_a_zero_offset_has_cosine_zero():
    # max(||o_i|| ||o_j||, 1e-6) = 1e-6 and o_i . o_j = 0: cosine 0, so t = 0.
    close(stock([1.0, 2.0], [[0.0, 0.0], [1.0, 2.0]]), [1.0, 2.0])
    close(stock([1.0, 2.0], [[0.0, 0.0], [0.0, 0.0]]), [1.0, 2.0])
    # N = 3, one zero offset: cosines 0, 0, 1 -> c = 1/3, t = 1 / (1 + 2/3) = 0.6;
    # mean offset [2/3, 0].
    close(stock([0.0, 0.0], [[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), [0.4, 0.0])


def test_tiny_offsets_meet_the_norm_product_floor():
    # ||o_1|| ||o_2|| = 1e-8 < 1e-6: cos = 1e-8 / 1e-6 = 0.01, t = 0.02 / 1.01
    # (without the floor: cos = 1 and t = 1).
    t = ratio(2, 0.01)
    got = stock([0.0, 0.0], [[1e-4, 0.0], [1e-4, 0.0]])
    torch.testing.assert_close(got, torch.tensor([t * 1e-4, 0.0]), rtol=1e-4, atol=0.0)


def test_cancelling_offsets_keep_the_base():
    # One-entry tensors: every cosine is exactly -1, 0 or 1. Opposite moves: c = -1 and
    # 1 + (N - 1) c = 0: t = 0 (mergekit 0.1.5), not inf/nan.
    close(stock(2.0, [1.0, -3.0]), 2.0)
    # N = 4, signs + + - -: c = -1/3 = -1/(N - 1): the denominator is 0 again.
    close(stock(2.0, [1.0, 2.0, -1.0, -0.5]), 2.0)
    # N = 3, signs + - -: c = -1/3, t = -1 / (1/3) = -3; mean offset -1/3 -> +1.
    close(stock(2.0, [1.0, -1.0, -1.0]), 3.0)


def test_filter_wise_gives_each_row_its_own_ratio():
    # Row 0: aligned offsets (t = 1, the average); row 1: orthogonal (t = 0, the base).
    pre = [[0.0, 0.0], [1.0, 1.0]]
    offsets = [[[1.0, 1.0], [1.0, 0.0]], [[3.0, 3.0], [0.0, 1.0]]]
    close(stock(pre, offsets, filter_wise=True), [[2.0, 2.0], [1.0, 1.0]])
    # Flattened, one cosine for the whole tensor: o_1 . o_2 = 6, c = 6 / (sqrt(3) sqrt(19)).
    flat = stock(pre, offsets)
    c = (3 + 3) / (math.sqrt(3) * math.sqrt(19))
    t = ratio(2, c)
    close(flat, [[2 * t, 2 * t], [1.0 + 0.5 * t, 1.0 + 0.5 * t]])


def test_filter_wise_rows_run_along_the_last_dimension():
    # [2, 1, 2]: rows are the pairs of the last dimension; a 1-D tensor is one row.
    pre = torch.zeros(2, 1, 2)
    a = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    b = torch.tensor([[[0.0, 1.0]], [[2.0, 2.0]]])
    finetuned = {"a": {"w": a, "v": torch.tensor([1.0, 0.0])}, "b": {"w": b, "v": torch.ones(2)}}
    out = mergebench.merge(
        "model_stock", {"w": pre, "v": torch.zeros(2)}, finetuned, progress=False,
        filter_wise=True,
    ).state_dict()  # fmt: skip
    close(out["w"], [[[0.0, 0.0]], [[1.5, 1.5]]])  # row 0 orthogonal, row 1 aligned
    t = ratio(2, math.sqrt(0.5))
    close(out["v"], [t, 0.5 * t])


@pytest.fixture(scope="module")
def random_pool():
    g = torch.Generator().manual_seed(7)
    pre = {
        "embed.weight": torch.randn(30, 16, generator=g),
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bias": torch.randn(16, generator=g),
        "scale": torch.tensor(0.5),
        "half.weight": torch.randn(12, 10, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "position_ids": torch.arange(5),
        "head.weight": torch.randn(3, 16, generator=g),
    }
    shared = {k: torch.randn(v.shape, generator=g) for k, v in pre.items()}
    finetuned = {}
    for task in ("a", "b", "c", "d"):
        # A common direction plus each task's own: positive, task-dependent cosines.
        finetuned[task] = {
            k: (v.float() + 0.1 * shared[k] + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point()
            else v.clone()
            for k, v in pre.items()
        }
    finetuned["d"]["bias"] = pre["bias"].clone()  # a zero offset
    return pre, finetuned


@pytest.mark.parametrize("tasks", [("a", "b"), ("a", "b", "c", "d")])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_streamed_in_memory_and_reference_agree(random_pool, tasks, filter_wise, tmp_path):
    pre, pool = random_pool
    finetuned = {t: pool[t] for t in tasks}
    exclude = [r"head\..*"]
    options = {"exclude": exclude, "progress": False, "filter_wise": filter_wise}
    in_memory = mergebench.merge("model_stock", pre, finetuned, **options).state_dict("a")
    streamed = mergebench.merge(
        "model_stock", pre, finetuned, output_dir=tmp_path / "out", shard_size=400, **options
    ).state_dict("a")
    expected = model_stock_reference(pre, finetuned, exclude=exclude, filter_wise=filter_wise)
    assert set(expected) == {k for k in pre if pre[k].is_floating_point() and k != "head.weight"}
    for key, value in expected.items():
        assert torch.equal(in_memory[key], streamed[key]), key
        assert in_memory[key].dtype == pre[key].dtype
        tol = {"rtol": 8e-3, "atol": 8e-3} if value.dtype == torch.bfloat16 else {}
        torch.testing.assert_close(in_memory[key].float(), value.float(), **tol)
    assert torch.equal(in_memory["head.weight"], pool["a"]["head.weight"])
    assert torch.equal(in_memory["position_ids"], pre["position_ids"])


def test_one_model_is_an_error():
    with pytest.raises(
        MergeBenchError, match=r"model_stock: needs at least two fine-tuned models, got 1"
    ):
        mergebench.merge("model_stock", {"w": torch.zeros(2)}, {"a": {"w": torch.ones(2)}},
                         progress=False)  # fmt: skip


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_filter_wise_must_be_a_flag(value):
    pre, finetuned = {"w": torch.zeros(2)}, {t: {"w": torch.ones(2)} for t in "ab"}
    with pytest.raises(MergeBenchError, match="model_stock.filter_wise"):
        mergebench.merge("model_stock", pre, finetuned, progress=False, filter_wise=value)
