"""DARE's counter-based draws (methods.md, method version 2): any block of any key is drawn on
its own, so results are bit-identical whatever the worker threads and row blocks; the keep
rate is 1 - p within binomial bounds and kept entries are exactly tau / (1 - p)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mergebench
import mergebench.engine.stream as stream_module
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TaskVectorStream
from mergebench.methods.dare import (
    DRAWS_VERSION,
    draw_words,
    drop_and_rescale,
    make_dropper,
    philox_key,
)
from mergebench.reference import merge_reference


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize(("start", "count"), [(0, 1), (0, 8), (3, 5), (5, 19), (8, 64),
                                              (61, 1000), (999, 1)])  # fmt: skip
def test_a_block_draw_is_the_slice_of_the_whole_key_draw(start, count):
    key = philox_key(3, 1, "model.embed_tokens.weight")
    whole = draw_words(key, 0, 2000)
    assert whole.dtype == np.dtype("<u4")
    assert np.array_equal(draw_words(key, start, count), whole[start : start + count])


def test_words_are_the_low_then_high_halves_of_philox_outputs():
    key = philox_key(0, 0, "w")
    raw = np.random.Philox(key=key).random_raw(4)
    low_high = [int(r) & 0xFFFFFFFF for r in raw], [int(r) >> 32 for r in raw]
    expected = [word for pair in zip(*low_high, strict=True) for word in pair]
    assert draw_words(key, 0, 8).tolist() == expected


def test_keys_differ_by_seed_task_and_key_name():
    keys = {
        tuple(philox_key(seed, task, name))
        for seed in (0, 1, -1)
        for task in (0, 1)
        for name in ("a", "b")
    }
    assert len(keys) == 12


def test_the_transform_of_a_row_block_is_that_block_of_the_whole_key():
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 37, 24, generator=g)
    dropper = make_dropper(3, 0.6, True, seed=5)
    whole = dropper("emb", taus.clone(), None)
    for start, stop in [(0, 2), (2, 5), (5, 36), (36, 37)]:
        block = dropper("emb", taus[:, start:stop].clone(), (start, stop))
        assert torch.equal(bits(block), bits(whole[:, start:stop])), (start, stop)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p_and_kept_entries_are_exactly_rescaled(p):
    n = 400_000
    tau = torch.randn(n, generator=torch.Generator().manual_seed(1))
    tau[tau == 0] = 1.0
    dropped = drop_and_rescale(tau.clone(), p, True, philox_key(0, 0, "w"))
    kept = dropped != 0
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(int(kept.sum()) - n * (1 - p)) < 5 * sigma
    assert torch.equal(bits(dropped[kept]), bits(tau[kept] / (1 - p)))
    plain = drop_and_rescale(tau.clone(), p, False, philox_key(0, 0, "w"))
    assert torch.equal(plain != 0, kept) and torch.equal(plain[kept], tau[kept])


def test_no_drop_keeps_everything_and_a_drop_near_one_keeps_nothing():
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(drop_and_rescale(tau.clone(), 0.0, True, philox_key(0, 0, "w")), tau)
    nearly = drop_and_rescale(tau.clone(), 1 - 2.0**-40, True, philox_key(0, 0, "w"))
    assert not bool(nearly.any())


# --- whole merges -----------------------------------------------------------------------------
SHAPES = {"emb": (37, 24), "narrow": (50, 3), "flat": (200,), "small": (4, 4)}


def pool(tmp_path, num_tasks: int = 3) -> tuple[str, dict[str, str]]:
    g = torch.Generator().manual_seed(0)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    save_file(pre, tmp_path / "pre.safetensors")
    finetuned = {}
    for t in range(num_tasks):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        save_file(state, tmp_path / f"t{t}.safetensors")
        finetuned[f"t{t}"] = str(tmp_path / f"t{t}.safetensors")
    return str(tmp_path / "pre.safetensors"), finetuned


BASES = [
    {"base": "task_arithmetic"},
    {"base": "ties", "base_params": {"k": 0.4, "topk_scope": "global"}},
    {"base": "ties", "base_params": {"k": 0.4, "topk_scope": "tensor"}},
    {"base": "weight_averaging", "rescale": False},
]


@pytest.mark.parametrize("params", BASES, ids=lambda p: p["base"] + str(p.get("base_params")))
def test_the_merge_is_bit_identical_across_threads_and_row_blocks(tmp_path, monkeypatch, params):
    pre, finetuned = pool(tmp_path)
    results = []
    for threads, limit in [("1", None), ("2", None), ("4", None), ("1", 64), ("4", 64)]:
        monkeypatch.setenv("MERGEBENCH_THREADS", threads)
        if limit is not None:
            monkeypatch.setattr(stream_module, "REUSE_MAX_NUMEL", limit)
        result = mergebench.merge("dare", pre, finetuned, progress=False, drop=0.6, seed=9,
                                  **params)  # fmt: skip
        results.append(result.state_dict())
    for other in results[1:]:
        for key, value in results[0].items():
            assert torch.equal(bits(other[key]), bits(value)), key
    reference = merge_reference("dare", pre, finetuned, drop=0.6, seed=9, **params)
    for key, expected in reference.merged.items():
        assert torch.equal(bits(results[-1][key]), bits(expected)), key


def test_row_blocks_reach_dare_on_a_base_that_goes_entry_by_entry(tmp_path, monkeypatch):
    pre, finetuned = pool(tmp_path)
    seen = []
    dropper = make_dropper(3, 0.5, True, 0)
    monkeypatch.setattr(stream_module, "REUSE_MAX_NUMEL", 64)
    stream = TaskVectorStream(ModelPool.from_checkpoints(pre, finetuned), progress=False,
                              transform_factory=lambda: dropper)  # fmt: skip
    for key, rows in stream.map(lambda item: item.rows, row_blocks=True):
        seen.append((key, rows))
    assert ("emb", (0, 2)) in seen and ("emb", None) not in seen


def test_a_transform_that_is_not_order_free_sees_whole_keys_in_order(tmp_path, monkeypatch):
    pre, finetuned = pool(tmp_path)
    calls = []

    def transform(key, task_vectors, rows):
        calls.append((key, rows))
        return task_vectors

    monkeypatch.setenv("MERGEBENCH_THREADS", "3")
    monkeypatch.setattr(stream_module, "REUSE_MAX_NUMEL", 64)
    stream = TaskVectorStream(ModelPool.from_checkpoints(pre, finetuned), progress=False,
                              transform_factory=lambda: transform)  # fmt: skip
    keys = [key for key, _ in stream.map(lambda item: item.rows, row_blocks=True)]
    assert calls == [(key, None) for key in keys] and keys == stream.plan.merged


def test_a_saved_dare_result_records_its_method_version(tmp_path):
    pre, finetuned = pool(tmp_path)
    mergebench.merge("dare", pre, finetuned, progress=False, output_dir=tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "result.json").read_text())
    assert meta["extra"]["method_version"] == DRAWS_VERSION == 2
    plain = mergebench.merge("task_arithmetic", pre, finetuned, progress=False)
    assert plain.extra["method_version"] == 1
