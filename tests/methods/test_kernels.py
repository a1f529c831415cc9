"""The compiled kernels (`mergebench.engine.kernels`) against the numpy/torch code they
replaced, bit for bit (`assert_array_equal` on the float bits), on data with exact ties,
zero sums, -0.0, tiny and huge magnitudes, and odd sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mergebench.engine import kernels
from mergebench.engine.topk import RadixSelect
from mergebench.methods import modulators, ties
from mergebench.methods.dare import draw_words, drop_and_rescale, keep_threshold, philox_key

SIZES = [1, 7, 8, 9, 127, 129, 1000, 8193, 40_000, 70_001]


def hard_task_vectors(rng: np.random.Generator, n_tasks: int, n: int) -> np.ndarray:
    """Coarse values (exact ties, zero task sums, -0.0) mixed with values spread over 80
    binades (float64 sums that depend on their order)."""
    taus = rng.integers(-3, 4, (n_tasks, n)).astype(np.float32) * np.float32(0.5)
    spread = rng.standard_normal((n_tasks, n)) * np.exp2(rng.integers(-40, 40, (n_tasks, n)))
    wide = rng.random((n_tasks, n)) < 0.5
    taus[wide] = spread[wide].astype(np.float32)
    taus[:, ::7] = 0.0
    taus[:, ::13] = -0.0
    taus[rng.integers(n_tasks), ::11] = -0.0
    return taus


def f32_bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.int32)


# --- the numpy code the kernels replaced (mergebench before the kernels), as the yardstick --
_SIGN_BIT = -(2**31)


def old_elect_block(task_vectors: np.ndarray, total: np.ndarray, out: np.ndarray) -> None:
    high = np.maximum.reduce(task_vectors, axis=0)
    low = np.minimum.reduce(task_vectors, axis=0)
    t, h, lo = total.view(np.int32), high.view(np.int32), low.view(np.int32)
    positive = np.right_shift(np.bitwise_and(np.invert(t), np.negative(t)), 31)
    negative = np.bitwise_or(np.bitwise_and(lo, np.right_shift(lo, 31)), np.int32(_SIGN_BIT))
    chosen = out.view(np.int32)
    np.bitwise_xor(negative, np.bitwise_and(np.bitwise_xor(negative, h), positive), out=chosen)


def old_elect_sum_block(task_vectors: np.ndarray, total: np.ndarray, out: np.ndarray) -> None:
    flag = np.where(total > 0, np.float32(1), np.float32(-1))
    work = np.empty_like(out)
    out.fill(0)
    for tau in task_vectors:
        out += np.maximum(np.multiply(tau, flag, out=work), 0, out=work)
    out *= flag


def old_modulate(taus, uni, elect, mask, rescale, block=1 << 15):
    n, numel = taus.shape
    uni = uni.copy()
    total = np.add.reduce(taus, axis=0) if elect else None
    packed = np.empty((n, (numel + 7) // 8), dtype=np.uint8)
    numerator, denominator = np.zeros(n), np.zeros(n)
    for start in range(0, numel, block):
        stop = min(numel, start + block)
        t, u = taus[:, start:stop], uni[start:stop]
        if elect:
            elect(t, total[start:stop], u)
        m = np.sign(t) * np.sign(u) > 0
        if mask:
            packed[:, start // 8 : (stop + 7) // 8] = np.packbits(m, axis=-1, bitorder="little")
        if rescale:
            numerator += np.add.reduce(np.abs(t), axis=1, dtype=np.float64)
            u_abs = np.abs(u)
            if mask:
                denominator += np.add.reduce(u_abs * m, axis=1, dtype=np.float64)
            else:
                denominator += np.add.reduce(u_abs, dtype=np.float64)
    return uni, packed, numerator, denominator


def old_ties(taus, thresholds, aggregate, scaling):
    trimmed = taus * (np.abs(taus) >= thresholds[:, None])
    total = np.add.reduce(trimmed, axis=0)
    gamma = (total > 0) * np.float32(2) - np.float32(1)
    agree = trimmed * gamma > 0
    out = np.add.reduce(trimmed * agree, axis=0)
    if aggregate == "mean":
        count = np.add.reduce(agree, axis=0, dtype=np.int64)
        out = out / np.maximum(count, 1).astype(np.float32)
        out[count == 0] = 0.0
    return out * np.float32(scaling)


def old_drop(tau: torch.Tensor, p: float, rescale: bool, key: np.ndarray, start: int):
    words = draw_words(key, start, tau.numel())
    threshold = keep_threshold(p)
    keep = np.zeros(words.shape, bool) if threshold > 2**32 - 1 else words >= threshold
    tau.mul_(torch.from_numpy(keep))
    return tau.div_(1.0 - p) if rescale else tau


# --- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("magnitude", [None, "max", "sum"])
def test_modulate_kernel_matches_the_numpy_code_bit_for_bit(n, magnitude):
    rng = np.random.default_rng(n)
    elect = {None: None, "max": old_elect_block, "sum": old_elect_sum_block}[magnitude]
    for n_tasks in (1, 2, 5, 8):
        taus = hard_task_vectors(rng, n_tasks, n)
        given = None if magnitude else hard_task_vectors(rng, 1, n)[0]
        start = np.zeros(n, np.float32) if given is None else given
        for mask in (True, False):
            for rescale in (True, False):
                uni, packed, num, den = old_modulate(taus, start, elect, mask, rescale)
                new = modulators._modulate_blocks(
                    torch.from_numpy(taus),
                    None if given is None else torch.from_numpy(given),
                    mask, "global", rescale, magnitude,
                )  # fmt: skip
                np.testing.assert_array_equal(f32_bits(new.unified.numpy()), f32_bits(uni))
                if mask:
                    np.testing.assert_array_equal(new.packed.numpy(), packed)
                else:
                    assert new.packed is None
                np.testing.assert_array_equal(new.numerator.numpy().view(np.int64),
                                              num.view(np.int64))  # fmt: skip
                np.testing.assert_array_equal(new.denominator.numpy().view(np.int64),
                                              den.view(np.int64))  # fmt: skip


def test_float64_sums_depend_on_the_order_on_this_data():
    """The sums test above would not see a wrong order on easy data: here a naive sum differs."""
    row = np.abs(hard_task_vectors(np.random.default_rng(1), 1, 40_000)[0]).astype(np.float64)
    naive = 0.0
    for x in row:
        naive += x
    assert naive != np.add.reduce(row)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 127, 128, 129, 1000, 8191, 8192])
@pytest.mark.parametrize(("a_start", "b_start"), [(0, 0), (3, 0), (0, 8), (13, 5)])
def test_pairwise_sums_one_row_or_two_in_one_walk_are_each_numpys(n, a_start, b_start):
    """`_pairwise_sums` walks the tree for one row or for two at once, at any offsets: each
    sum is numpy's float64 pairwise sum of that row's magnitudes, to the bit."""
    rng = np.random.default_rng(n + a_start)
    a = hard_task_vectors(rng, 1, n + a_start)[0]
    b = hard_task_vectors(rng, 1, n + b_start)[0]
    nodes = np.empty((64, 3), dtype=np.int64)
    values, second = np.empty((2, 64)), np.empty(1)

    def bits(x: float) -> int:
        return int(np.float64(x).view(np.int64))

    def numpys(row: np.ndarray) -> float:
        return np.add.reduce(np.abs(row).astype(np.float64))

    first = kernels._pairwise_sums(a, a_start, b, b_start, n, True, nodes, values, second)
    assert bits(first) == bits(numpys(a[a_start:]))
    assert bits(second[0]) == bits(numpys(b[b_start:]))
    second[0] = -1.0
    alone = kernels._pairwise_sums(a, a_start, b, b_start, n, False, nodes, values, second)
    assert bits(alone) == bits(first) and second[0] == -1.0  # b untouched


@pytest.mark.parametrize("n", SIZES)
def test_ties_kernel_matches_the_numpy_code_bit_for_bit(n):
    rng = np.random.default_rng(n)
    for n_tasks in (1, 3, 8):
        taus = hard_task_vectors(rng, n_tasks, n)
        thresholds = np.abs(taus[:, rng.integers(n, size=n_tasks)]).diagonal().copy()
        thresholds[0] = 0.0
        for aggregate in ("sum", "mean"):
            for scaling in (0.3, 1.0, -1 / 3):
                expected = old_ties(taus, thresholds, aggregate, scaling)
                got = ties._merge_blocks(
                    torch.from_numpy(taus), torch.from_numpy(thresholds), aggregate, scaling
                )
                np.testing.assert_array_equal(f32_bits(got.numpy()), f32_bits(expected))


@pytest.mark.parametrize("n", SIZES)
def test_task_sum_kernel_matches_numpy(n):
    taus = hard_task_vectors(np.random.default_rng(n), 6, n)
    out = np.empty(n, np.float32)
    kernels.scaled_task_sum(taus, np.float32(0.3), out)
    expected = np.float32(0.3) * np.add.reduce(taus, axis=0)
    np.testing.assert_array_equal(f32_bits(out), f32_bits(expected))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1 - 2.0**-40])
@pytest.mark.parametrize("start", [0, 3, 65_536 + 5])
def test_dare_kernel_matches_the_torch_code_bit_for_bit(p, start):
    taus = hard_task_vectors(np.random.default_rng(7), 1, 70_001)[0]
    key = philox_key(5, 1, "layer.weight")
    for rescale in (True, False):
        got = drop_and_rescale(torch.from_numpy(taus.copy()), p, rescale, key, start)
        expected = torch.from_numpy(taus.copy())
        for offset in range(0, expected.numel(), 1 << 16):  # the old chunks
            old_drop(expected[offset : offset + (1 << 16)], p, rescale, key, start + offset)
        np.testing.assert_array_equal(f32_bits(got.numpy()), f32_bits(expected.numpy()))


def test_radix_counts_match_bincount():
    rng = np.random.default_rng(3)
    chunk = torch.from_numpy(hard_task_vectors(rng, 3, 9_999))
    select = RadixSelect([10, 500, 9_999])
    high = select.high_counts(chunk)
    bits = chunk.numpy().view(np.uint32)
    for r in range(3):
        folded = np.bincount((bits[r] >> 16) & 0x7FFF, minlength=1 << 16)
        np.testing.assert_array_equal(high[r].numpy(), folded)
    select.add_high(high)
    low = select.low_counts(chunk)
    for r, (top, _) in enumerate(select.targets()):
        selected = bits[r][((bits[r] >> 16) & 0x7FFF) == top] & 0xFFFF
        np.testing.assert_array_equal(low[r].numpy(), np.bincount(selected, minlength=1 << 16))
    select.add_low(low)
    expected = [np.sort(np.abs(chunk[r].numpy()))[::-1][k - 1] for r, k in enumerate(select.k)]
    np.testing.assert_array_equal(select.values().numpy(), np.array(expected, np.float32))


def expected_window_counts(raw: np.ndarray, lows: np.ndarray, size: int):
    """numpy's `window_counts`: per task the counts of |tau|'s bits in each window value,
    the count above the window, and whether every task sum is finite."""
    taus = raw[1:] - raw[0]
    bits = taus.view(np.uint32) & np.uint32(0x7FFFFFFF)
    window = np.zeros((len(taus), size), np.int64)
    above = np.zeros(len(taus), np.int64)
    for t, (row, low) in enumerate(zip(bits.astype(np.int64), lows.astype(np.int64), strict=True)):
        inside = row[(row >= low) & (row < low + size)] - low
        window[t] = np.bincount(inside, minlength=size)
        above[t] = np.count_nonzero(row >= low + size)
    total = np.zeros(raw.shape[1], np.float32)
    for tau in taus:
        total += tau
    return window, above, bool(np.isfinite(total).all())


@pytest.mark.parametrize("width", [0, 1, 7, 8, 9, 64, 1_003, 9_999])
def test_window_counts_are_numpys(width):
    """`window_counts`: the raw entries' task vectors counted into each task's window of
    values and above it (windows at 0, around the populated values, at the top of the
    range, one value wide), the finiteness of the task sums as `subtract_and_check`; the
    8-lane body and the scalar tail alike (widths around multiples of 8)."""
    rng = np.random.default_rng(width)
    taus = hard_task_vectors(rng, 4, width)
    pre = (rng.standard_normal(width) * 0.01).astype(np.float32)
    raw = np.ascontiguousarray(np.concatenate([pre[None], taus + pre]), dtype=np.float32)
    populated = max(4_096, int(np.median(np.abs(raw[2] - raw[0]).view(np.uint32))) if width else 0)
    for size, lows in [
        (4_096, np.array([0, populated - 2_048, 0x7F800000 - 4_096, populated], np.uint32)),
        (1, np.array([0, populated, 0x3F000000, 0x7FFFFFFE], np.uint32)),
    ]:
        window = np.full((4, size), 5, np.int64)  # counts add to what is there
        above = np.full(4, 7, np.int64)
        sums = np.empty(width + 3, np.float32)
        finite = kernels.window_counts(raw, lows, window, above, sums)
        want_window, want_above, want_finite = expected_window_counts(raw, lows, size)
        np.testing.assert_array_equal(window - 5, want_window)
        np.testing.assert_array_equal(above - 7, want_above)
        assert finite == want_finite
    if width >= 64:
        assert want_window.sum() or want_above.sum()


def test_window_counts_edges_by_hand():
    """Window `[bits(0.5), bits(0.5) + 2)`: 0.5 and -0.5 and the next float up count in it,
    the one after that is above, the one below 0.5 is neither (9 entries: the 8-lane body
    and a tail of one)."""
    half = np.float32(0.5)
    up = np.nextafter(half, np.float32(1))
    values = [half, -half, up, np.nextafter(up, np.float32(1)), np.nextafter(half, np.float32(0)),
              np.float32(2), np.float32(0), -np.float32(0), -up]  # fmt: skip
    raw = np.stack([np.zeros(9, np.float32), np.array(values, np.float32)])
    low = np.array([half.view(np.uint32)], np.uint32)
    window, above = np.zeros((1, 2), np.int64), np.zeros(1, np.int64)
    assert kernels.window_counts(raw, low, window, above, np.empty(9, np.float32))
    assert window.tolist() == [[2, 2]] and above.tolist() == [2]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_window_counts_finds_a_non_finite_task_sum(bad):
    """A nan/inf entry, or task vectors whose sum overflows, as `subtract_and_check`."""
    rng = np.random.default_rng(2)
    raw = rng.standard_normal((4, 100)).astype(np.float32)
    raw[2, 37] = bad
    args = (np.zeros(3, np.uint32), np.zeros((3, 8), np.int64), np.zeros(3, np.int64),
            np.empty(100, np.float32))  # fmt: skip
    assert not kernels.window_counts(raw, *args)
    raw[2, 37] = 0.0
    assert kernels.window_counts(raw, *args)
    raw[1:, 50] = 3.0e38  # each finite; their sum is not
    assert not kernels.window_counts(raw, *args)
    total = np.empty(100, np.float32)
    assert kernels.subtract_and_check(raw[0], raw[1:].copy(), 0, 100, total) is False


def test_the_kernel_cache_falls_back_to_a_writable_folder(tmp_path, monkeypatch):
    """A read-only install (no writable `__pycache__` nor user cache): the temporary folder."""
    blocked = tmp_path / "a file"
    blocked.write_text("")
    assert kernels.first_writable([blocked / "pycache", tmp_path / "ok"]) == tmp_path / "ok"
    assert kernels.first_writable([blocked / "pycache"]) is None
    monkeypatch.setattr(kernels.numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(kernels, "__file__", str(blocked / "kernels.py"))
    monkeypatch.setattr(kernels, "AppDirs", lambda **_: type("D", (), {"user_cache_dir": blocked}))
    monkeypatch.setattr(kernels.tempfile, "tempdir", str(tmp_path))
    kernels._ensure_cache_dir()
    assert Path(kernels.numba.config.CACHE_DIR).parent == tmp_path


@pytest.mark.parametrize("start", [0, 1, 7, 8, 4_095, 4_097, 2**33 + 5])
@pytest.mark.parametrize("n", SIZES)
def test_philox_drop_kernel_draws_numpys_words(n, start):
    """The kernel's own Philox rounds give `draw_words`' words (numpy's `random_raw`), for
    rows cut anywhere in a block of 8 words, across its batches of words and at counters
    past 2^32."""
    taus = hard_task_vectors(np.random.default_rng(n), 1, n)[0]
    key = philox_key(11, 3, "blocks.0.weight")
    for p in (0.3, 0.9):
        threshold = keep_threshold(p)
        got = taus.copy()
        kernels.philox_drop_and_rescale(
            got, key[0], key[1], start, np.int64(threshold), False, np.float32(1 - p)
        )
        kept = draw_words(key, start, n) >= threshold
        np.testing.assert_array_equal(f32_bits(got), f32_bits(taus * kept))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("magnitude", ["max", "sum"])
def test_emr_span_kernel_matches_the_numpy_code_bit_for_bit(n, magnitude):
    """`kernels.emr_span` on raw weights (pretrained + experts), its chunk sums added up by
    `add_chunk_sums`, against the old numpy code on the task vectors: unified vector,
    packed masks and float64 statistics to the bit, also across several spans of a unit."""
    rng = np.random.default_rng(n + 1)
    elect = {"max": old_elect_block, "sum": old_elect_sum_block}[magnitude]
    code = {"max": kernels.ELECT_MAX, "sum": kernels.ELECT_SUM}[magnitude]
    chunk, per_block = kernels.CAST_CHUNK, modulators.SUM_BLOCK // kernels.CAST_CHUNK
    for n_tasks in (1, 2, 5, 8):
        taus = hard_task_vectors(rng, n_tasks, n)
        pre = rng.integers(-2, 3, n).astype(np.float32) * np.float32(0.25)
        pre[::5] = -0.0
        weights = (taus + pre).astype(np.float32)  # exact: coarse pre, so taus come back
        taus = weights - pre
        for mask in (True, False):
            for rescale in (True, False):
                uni, packed, num, den = old_modulate(taus, np.zeros(n, np.float32), elect, mask,
                                                     rescale)  # fmt: skip
                chunks = -(-n // chunk)
                got_uni = np.empty(n, np.float32)
                got_packed = np.zeros((n_tasks, (n + 7) // 8 if mask else 0), np.uint8)
                sums = np.zeros((2, n_tasks, chunks))
                for first in range(0, n, 2 * chunk):  # spans of two chunks
                    stop = min(n, first + 2 * chunk)
                    rows = np.vstack([pre[None, first:stop], weights[:, first:stop]]).copy()
                    span_uni = np.empty(stop - first, np.float32)
                    span_packed = np.zeros((n_tasks, -(-(stop - first) // 8) if mask else 0),
                                           np.uint8)  # fmt: skip
                    span_sums = np.zeros((2, n_tasks, -(-(stop - first) // chunk)))
                    assert kernels.emr_span(rows[0], rows[1:], code, mask, rescale, span_uni,
                                            span_packed, span_sums[0], span_sums[1])  # fmt: skip
                    np.testing.assert_array_equal(f32_bits(rows[1:]), f32_bits(taus[:, first:stop]))
                    got_uni[first:stop] = span_uni
                    got_packed[:, first // 8 : first // 8 + span_packed.shape[1]] = span_packed
                    sums[:, :, first // chunk : first // chunk + span_sums.shape[2]] = span_sums
                np.testing.assert_array_equal(f32_bits(got_uni), f32_bits(uni))
                if mask:
                    np.testing.assert_array_equal(got_packed, packed)
                if not rescale:
                    continue
                numerator, denominator = np.zeros(n_tasks), np.zeros(n_tasks)
                kernels.add_chunk_sums(sums[0], per_block, numerator)
                if mask:
                    kernels.add_chunk_sums(sums[1], per_block, denominator)
                else:
                    for start in range(0, chunks, per_block):
                        block = np.zeros(1)
                        kernels.add_chunk_sums(sums[1][:1, start : start + per_block], per_block,
                                               block)  # fmt: skip
                        denominator += block[0]
                np.testing.assert_array_equal(numerator.view(np.int64), num.view(np.int64))
                np.testing.assert_array_equal(denominator.view(np.int64), den.view(np.int64))


@pytest.mark.parametrize("where", [8500, 9001])  # in the 8-lane body, in the tail
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, "overflow"])
def test_span_kernels_report_a_non_finite_task_sum(bad, where):
    """A nan/inf entry, or finite task vectors whose sum overflows, anywhere in a span; the
    same span without it passes."""
    weights = np.ones((4, 9003), np.float32)
    if bad == "overflow":
        weights[1:, where] = 3.0e38
    else:
        weights[2, where] = bad
    for broken in (True, False):
        rows = weights.copy() if broken else np.ones((4, 9003), np.float32)
        unified, packed = np.empty(9003, np.float32), np.zeros((3, 1126), np.uint8)
        sums = np.zeros((2, 3, 2))
        found = kernels.emr_span(rows[0], rows[1:], kernels.ELECT_MAX, True, True, unified,
                                 packed, sums[0], sums[1])  # fmt: skip
        assert found is not broken
    rows, out = weights.copy(), np.empty(9003, np.float32)
    no_keys = np.zeros((3, 2), np.uint64)
    assert not kernels.task_arithmetic_span(rows[0], rows[1:], np.float32(0.3), 0, False, no_keys,
                                            np.int64(0), False, np.float32(1), out)  # fmt: skip
