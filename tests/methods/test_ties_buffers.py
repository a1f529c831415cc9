"""TIES per tensor without temporaries: the radix-select threshold is torch.topk's, a keep-all
threshold trims nothing, and the stream's reused buffers (the kernel's output, the float32 sum
cast to bf16) give the in-memory and reference results bit for bit over keys of odd,
growing and shrinking sizes, with several row blocks in flight."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import mergebench
import mergebench.engine.stream as stream_module
from mergebench.engine.stream import TaskVectorStream
from mergebench.methods.ties import keep_count, tensor_thresholds, trim
from mergebench.reference import merge_reference


def topk_thresholds(taus: torch.Tensor, k: float) -> torch.Tensor:
    keep = keep_count(k, taus[0].numel())
    return torch.stack(
        [torch.topk(t.abs().reshape(-1), keep, sorted=False).values.min() for t in taus]
    )


@pytest.mark.parametrize("k", [0.001, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(3, 7), (3, 13, 17), (2, 4099)])
def test_the_radix_threshold_is_the_topk_one(shape, k):
    g = torch.Generator().manual_seed(sum(shape))
    numel = math.prod(shape[1:])
    assert keep_count(k, numel) < numel  # some entry trimmed: a threshold to find
    # Quarter steps: many equal magnitudes (ties at the threshold), zeros and -0.0.
    taus = torch.randint(-6, 7, shape, generator=g).float() * 0.25
    taus[0].reshape(-1)[0] = -0.0
    got = tensor_thresholds(taus, k)
    expected = topk_thresholds(taus, k)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    # Continuous values too (no ties), where one bit off would move the threshold.
    taus = torch.randn(shape, generator=g)
    assert torch.equal(tensor_thresholds(taus, k), topk_thresholds(taus, k))


def test_keeping_every_entry_trims_nothing_as_the_minimum_magnitude_would():
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 5, 9, generator=g)
    taus[1, 2, 3] = -0.0
    assert torch.equal(tensor_thresholds(taus[:, :1, :1], 0.2), torch.zeros(3))  # 1 of 1 kept
    zero = tensor_thresholds(taus, 1.0)  # keep_count(0.999, 45) is 45 as well
    assert torch.equal(tensor_thresholds(taus, 0.999), zero)
    assert torch.equal(zero, torch.zeros(3))
    minimum = topk_thresholds(taus, 1.0)
    assert torch.equal(trim(taus, zero).view(torch.int32), trim(taus, minimum).view(torch.int32))


# Sizes that grow, shrink and grow again (the reused buffers are sliced, then regrown); with
# the stream's limit at 64 entries "big" gets buffers of its own.
SHAPES = {"big": (41, 7), "a": (5, 3), "b": (13, 11), "c": (1,), "d": (9, 9), "e": (3, 31)}


def bf16_pool(tmp_path) -> tuple[str, dict[str, str]]:
    g = torch.Generator().manual_seed(5)
    pre = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in SHAPES.items()}
    save_file(pre, tmp_path / "pre.safetensors")
    finetuned = {}
    for t in range(3):
        state = {
            k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
            for k, v in pre.items()
        }
        save_file(state, tmp_path / f"t{t}.safetensors")
        finetuned[f"t{t}"] = str(tmp_path / f"t{t}.safetensors")
    return str(tmp_path / "pre.safetensors"), finetuned


CASES = [
    ("ties", {"k": 0.3, "topk_scope": "tensor", "scaling": 0.7}),
    ("ties", {"k": 1.0, "topk_scope": "tensor", "aggregate": "mean"}),
    ("dare", {"drop": 0.7, "seed": 4, "base": "ties",
              "base_params": {"k": 1.0, "topk_scope": "tensor", "scaling": 1.0}}),
    ("dare", {"drop": 0.5, "seed": 4, "base": "ties",
              "base_params": {"k": 0.4, "topk_scope": "global", "scaling": 1.0}}),
    ("dare", {"drop": 0.5, "seed": 4, "base": "ties",
              "base_params": {"k": 0.4, "topk_scope": "tensor", "scaling": 1.0}}),
]  # fmt: skip


@pytest.mark.parametrize(("method", "params"), CASES, ids=[str(c) for c in CASES])
def test_streamed_equals_in_memory_equals_the_reference(tmp_path, monkeypatch, method, params):
    pre, finetuned = bf16_pool(tmp_path)
    reference = merge_reference(method, pre, finetuned, **params).merged
    monkeypatch.setattr(stream_module, "REUSE_MAX_NUMEL", 64)  # row blocks ("big" only)
    for threads in ("1", "2"):
        monkeypatch.setenv("MERGEBENCH_THREADS", threads)
        in_memory = mergebench.merge(method, pre, finetuned, progress=False, **params)
        streamed = mergebench.merge(
            method, pre, finetuned, progress=False, output_dir=tmp_path / threads, **params
        )
        for result in (in_memory, streamed):
            state = result.state_dict()
            for key, expected in reference.items():
                got = state[key]
                assert got.dtype == torch.bfloat16, key
                assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), key


def test_a_per_tensor_top_k_that_keeps_everything_takes_row_blocks(tmp_path, monkeypatch):
    pre, finetuned = bf16_pool(tmp_path)
    params = CASES[2][1]
    reference = merge_reference("dare", pre, finetuned, **params).merged
    units = []
    load = TaskVectorStream._load

    def spy(self, unit, buffers):
        units.append((unit.key, unit.rows))
        return load(self, unit, buffers)

    monkeypatch.setattr(stream_module, "REUSE_MAX_NUMEL", 64)
    monkeypatch.setattr(TaskVectorStream, "_load", spy)
    state = mergebench.merge(
        "dare", pre, finetuned, progress=False, output_dir=tmp_path / "out", **params
    ).state_dict()
    assert ("big", (0, 8)) in units and ("big", None) not in units
    for key, expected in reference.items():
        assert torch.equal(state[key].view(torch.int16), expected.view(torch.int16)), key
    units.clear()  # k < 1 per tensor: the thresholds counted over the blocks first
    mergebench.merge("ties", pre, finetuned, progress=False, k=0.9, topk_scope="tensor")
    assert ("big", None) not in units and units.count(("big", (0, 8))) == 3  # 2 counts + merge
    assert ("a", None) in units and units.count(("a", None)) == 1  # small keys: merge only
    monkeypatch.setenv("MERGEBENCH_TORCH_KERNELS", "1")  # the torch (GPU) path: whole keys
    units.clear()
    mergebench.merge("ties", pre, finetuned, progress=False, k=0.9, topk_scope="tensor")
    assert ("big", None) in units
