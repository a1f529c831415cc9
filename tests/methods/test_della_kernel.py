"""DELLA's compiled path (`engine.della_kernels`) against the torch formulas it replaced
(`methods.della` at 5b3dd87, copied here): the same bits on odd sizes, ties in magnitude
within a row, zeros, negative zeros, one-entry rows, bf16-valued and float32 task vectors."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from mergebench.engine.stream import TensorItem, sum_tasks
from mergebench.methods import della
from mergebench.methods.della import (
    Della,
    DrawCursors,
    della_delta,
    della_seed,
    keep_probabilities,
)


def old_magprune(tau, density, window, rescale, generator):
    q = keep_probabilities(tau, density, window)
    keep = torch.rand(tau.shape, generator=generator) < q
    kept = tau * keep
    return kept / q if rescale else kept


def old_elect_and_disjoint_mean(pruned):
    total = sum_tasks(pruned)
    gamma = torch.where(total >= 0, 1.0, -1.0).to(pruned.dtype)
    agree = pruned * gamma > 0
    agreeing = sum_tasks(pruned * agree)
    count = agree.sum(dim=0)
    return torch.where(count > 0, agreeing / count.clamp(min=1), torch.zeros_like(agreeing))


def old_della_delta(taus, key_index, density, window, rescale, scaling, seed):
    """The whole key at once (the old row blocks drew the same draws in the same order)."""
    generators = [
        torch.Generator().manual_seed(della_seed(seed, t, key_index)) for t in range(len(taus))
    ]
    pruned = torch.stack(
        [
            old_magprune(tau, density, window, rescale, g)
            for tau, g in zip(taus, generators, strict=True)
        ]
    )
    return torch.mul(old_elect_and_disjoint_mean(pruned), scaling)


def task_vectors(shape, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "bf16":  # differences of bf16 weights, as an LLM pool gives
        pre = torch.randn(shape, generator=g).to(torch.bfloat16).float()
        ft = (pre + 0.02 * torch.randn((3, *shape), generator=g)).to(torch.bfloat16).float()
        return ft - pre
    if kind == "ties":  # few values: many equal |tau| in a row, zeros and -0.0
        taus = torch.randint(-3, 4, (3, *shape), generator=g).float() * 0.5
        return torch.where(taus == 0, torch.where(torch.rand(taus.shape, generator=g) < 0.5,
                                                  -0.0, 0.0), taus)  # fmt: skip
    return torch.randn((3, *shape), generator=g) * torch.rand((3, *shape), generator=g)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (5, 1), (13, 37), (6, 3, 5), (3, 2049)])
@pytest.mark.parametrize("kind", ["float32", "bf16", "ties"])
@pytest.mark.parametrize(
    ("density", "window", "rescale", "scaling"),
    [(0.1, 0.1, True, 1.0), (0.5, 0.4, True, 0.3), (0.7, 0.14, False, 0.8)],
)
def test_the_kernel_gives_the_old_formula_bit_for_bit(shape, kind, density, window, rescale,
                                                      scaling):  # fmt: skip
    taus = task_vectors(shape, kind, seed=len(shape) * 7 + math.prod(shape))
    new = della_delta(taus, 4, density, window, rescale, scaling, 11)
    old = old_della_delta(taus, 4, density, window, rescale, scaling, 11)
    assert new.dtype == torch.float32 and new.shape == old.shape
    assert torch.equal(new.view(torch.int32), old.view(torch.int32))  # zeros' signs too


def test_nan_and_inf_rank_as_torch_sorts_them():
    taus = torch.randn(3, 4, 9)
    taus[0, 0, [1, 4, 6]] = torch.tensor([math.nan, -math.nan, math.inf])
    taus[1, 2, [0, 8]] = torch.tensor([-math.inf, math.nan])
    new = della_delta(taus, 0, 0.5, 0.4, True, 1.0, 2)
    old = old_della_delta(taus, 0, 0.5, 0.4, True, 1.0, 2)
    assert torch.equal(new.isnan(), old.isnan())
    assert torch.equal(new.nan_to_num(), old.nan_to_num())


def whole_key_draws(seed, num_tasks, key_index, numel):
    return torch.stack([
        torch.rand(numel, generator=torch.Generator().manual_seed(della_seed(seed, t, key_index)))
        for t in range(num_tasks)
    ])  # fmt: skip


def test_draw_cursors_give_each_block_the_whole_keys_draws_in_any_order():
    cursors = DrawCursors(seed=5, num_tasks=3)
    whole = whole_key_draws(5, 3, 2, 100)
    # In order (each block goes on from the last), out of order and again (fresh, skipped).
    for start, stop in [(0, 30), (30, 60), (80, 100), (60, 80), (30, 60), (0, 100)]:
        block = cursors.draws(2, start, stop - start, 100)
        assert torch.equal(block, whole[:, start:stop]), (start, stop)


def test_draw_cursors_on_threads_wait_for_the_block_before_them():
    cursors = DrawCursors(seed=1, num_tasks=2)
    blocks = [(key, start) for start in range(0, 4000, 250) for key in (0, 7)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda b: cursors.draws(b[0], b[1], 250, 4000), blocks))
    for (key, start), block in zip(blocks, got, strict=True):
        assert torch.equal(block, whole_key_draws(1, 2, key, 4000)[:, start : start + 250])
    assert not cursors._at  # every key's last block let its generators go


def test_draw_cursors_draw_into_the_buffer_given():
    cursors = DrawCursors(seed=4, num_tasks=2)
    buffer = torch.empty(2, 40)
    for start in (0, 40, 80):
        assert cursors.draws(3, start, 40, 120, out=buffer) is buffer
        assert torch.equal(buffer, whole_key_draws(4, 2, 3, 120)[:, start : start + 40])


def test_a_worker_reuses_its_result_buffer_from_block_to_block():
    # A fresh result (and draws) per 4M-entry block left 0.1-0.2 GiB more peak RSS on the
    # TinyLlama pool: the heap kept what it freed (docs/performance.md).
    method = Della(density=0.5, window=0.4, scaling=0.7, rescale=True, seed=6)
    taus = torch.randn(3, 64, 24)
    stream = SimpleNamespace(plan=SimpleNamespace(merged=["w"]), tasks=["a", "b", "c"],
                             numel=lambda key: taus[0].numel())  # fmt: skip
    method.prepare(stream)
    blocks, storage = [], set()
    for start in range(0, 64, 16):
        rows = taus[:, start : start + 16].contiguous()
        item = TensorItem("w", torch.zeros(16, 24), rows, torch.float32, rows=(start, start + 16))
        delta = method.merge_item(item)
        storage.add(delta.data_ptr())
        blocks.append(delta.clone())  # the next block overwrites it
    assert len(storage) == 1
    assert torch.equal(torch.cat(blocks), della_delta(taus, 0, 0.5, 0.4, True, 0.7, 6))


@pytest.mark.parametrize("shape", [(40, 3000), (7, 5), (9,), ()])
def test_a_whole_key_is_drawn_in_chunks_into_the_workers_buffer(monkeypatch, shape):
    # Rows of 3000: chunks of 2 rows; the result lies after the chunk's draws.
    monkeypatch.setattr(della, "BLOCK_NUMEL", 6000)
    method = Della(density=0.4, window=0.2, scaling=1.3, rescale=False, seed=2)
    taus = torch.randn(3, *shape)
    stream = SimpleNamespace(plan=SimpleNamespace(merged=["x", "w"]), tasks=["a", "b", "c"],
                             numel=lambda key: taus[0].numel())  # fmt: skip
    method.prepare(stream)
    storage = set()
    for _ in range(2):
        delta = method.merge_item(TensorItem("w", torch.zeros(shape), taus, torch.float32))
        storage.add(delta.data_ptr())
        assert torch.equal(delta, della_delta(taus, 1, 0.4, 0.2, False, 1.3, 2))
    assert len(storage) == 1
