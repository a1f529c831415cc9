"""Compiled CPU kernels (numba) for the hot data-free methods: one pass over the task rows.

Each kernel reads the `[N, numel]` float32 task vectors of a key (or row block) and writes
its outputs without `[N, ...]` temporaries, bit for bit what the numpy formulas they replace
computed:
- float32 sums over the task axis are added in task order from +0, `((0 + x_0) + x_1) + ...`
  (what numpy's reduction over the first axis of a C-contiguous array does: all -0.0
  entries sum to +0.0);
- float64 sums along a row repeat numpy's casting reduction exactly: the row cut into
  blocks (the old kernels' block size, `sum_block`), each summed as numpy does, i.e.
  `0 + pairwise(chunk_0) + pairwise(chunk_1) + ...` over chunks of its 8,192-entry cast
  buffer, with numpy's pairwise summation (`_pairwise_sums`) inside each chunk.

The kernels run serially and release the GIL (`nogil`): the stream already runs keys (and
row blocks) on one worker thread per core, and numba's default threading layer refuses
parallel kernels launched from several threads at once. `cache=True` keeps compiled code
between processes: in `$NUMBA_CACHE_DIR` if set, else next to this file, else (a read-only
install) in numba's per-user cache folder, else (neither writable: numba would refuse to
import this module) in a folder under the system's temporary directory.
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import numpy as np

from mergebench.util.fs import interrupts_deferred

# numba's import creates about a million objects: with the garbage collector paused, no
# full collection walks torch's and numba's objects meanwhile (see `warm_up`).
_collecting = gc.isenabled()
gc.disable()
try:
    import numba
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic
    from numba.misc.appdirs import AppDirs
finally:
    if _collecting:
        gc.enable()


def first_writable(folders: list[Path]) -> Path | None:
    """The first folder that exists or can be made and takes a file (numba's own test)."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError:
            continue
        return folder
    return None


def _ensure_cache_dir() -> None:
    if numba.config.CACHE_DIR:
        return
    numba_folders = [
        Path(__file__).parent / "__pycache__",
        Path(AppDirs(appname="numba", appauthor=False).user_cache_dir),
    ]
    if first_writable(numba_folders) is None:
        user = os.getuid() if hasattr(os, "getuid") else "user"
        fallback = first_writable([Path(tempfile.gettempdir()) / f"mergebench-numba-{user}"])
        if fallback is not None:  # else nothing is writable: numba says so itself
            numba.config.CACHE_DIR = str(fallback)


_ensure_cache_dir()

# numpy's default buffer size: a casting reduction sums chunks of this many entries.
_CAST_CHUNK = 8192
CAST_CHUNK = _CAST_CHUNK  # public: span kernels' callers cut spans on these chunks
# Depth bound of `_pairwise_sums`'s stacks (a chunk of 8,192 entries needs 8 levels).
_STACK = 64
# Entries per inner block of the float32 kernels (work arrays stay in L1/L2).
_BLOCK = 1024
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_FM1 = np.float32(-1.0)


@njit(cache=True, nogil=True, inline="always")
def _same_sign(x: np.float32, y: np.float32) -> int:
    """`sgn(x) * sgn(y) > 0` as 0 or 1, branch-free (a random mask mispredicts branches)."""
    return np.int64(((x > 0) & (y > 0)) | ((x < 0) & (y < 0)))


@njit(cache=True, nogil=True, inline="always")
def _term(a: np.ndarray, i: int) -> float:
    """Entry `i` as float64: itself (float64 `a`) or its magnitude (float32 `a`)."""
    return np.float64(abs(a[i]))


# --- 8-lane code for the intrinsics below (LLVM IR through llvmlite) -------------------------
_FLOATS8 = ir.VectorType(ir.FloatType(), 8)
_WORDS8 = ir.VectorType(ir.IntType(32), 8)


def _float32_c(array: types.Type, ndim: int) -> bool:
    """Whether numba's type `array` is a C-contiguous float32 array of `ndim` dimensions."""
    return (
        isinstance(array, types.Array) and array.dtype == types.float32
        and array.layout == "C" and array.ndim == ndim
    )  # fmt: skip


def _load8(builder, array, index):
    """`<8 x float>` from `array.data + index` (float32 entries, 4-byte aligned)."""
    where = builder.gep(array.data, [index])
    return builder.load(builder.bitcast(where, _FLOATS8.as_pointer()), align=4)


def _splat(value: float) -> ir.Constant:
    return ir.Constant(_FLOATS8, [value] * 8)


def _magnitudes8(builder, values):
    """`|values|` of a `<8 x float>`: the sign bits cleared, as `abs` does."""
    bits = builder.and_(builder.bitcast(values, _WORDS8), ir.Constant(_WORDS8, [0x7FFFFFFF] * 8))
    return builder.bitcast(bits, _FLOATS8)


@intrinsic
def _leaf_lanes(typingctx, a, start, whole):
    """numpy's pairwise leaf over `a[start : start + whole]` (`whole` a positive multiple of
    8, `a` contiguous float32), of the magnitudes in float64: 8 running sums, lane `k`
    `((|a_k| + |a_{k+8}|) + |a_{k+16}|) + ...`, combined as
    `((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))`. The lanes are one vector of 8
    float64 kept in registers: each lane's adds are the scalar code's, in its order, so
    the sum is the same to the bit (numba turns off the SLP vectorizer that would find
    this itself)."""
    if not _float32_c(a, 1):
        return None
    signature = types.float64(a, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        values = context.make_array(signature.args[0])(context, builder, args[0])
        first, count = args[1], args[2]
        doubles = ir.VectorType(ir.DoubleType(), 8)

        def magnitudes(offset):
            loaded = _load8(builder, values, builder.add(first, offset))
            return builder.fpext(_magnitudes8(builder, loaded), doubles)

        lanes = cgutils.alloca_once(builder, doubles)
        builder.store(magnitudes(ir.Constant(first.type, 0)), lanes)
        steps = builder.sub(builder.udiv(count, ir.Constant(count.type, 8)),
                            ir.Constant(count.type, 1))  # fmt: skip
        with cgutils.for_range(builder, steps) as loop:
            offset = builder.mul(builder.add(loop.index, ir.Constant(count.type, 1)),
                                 ir.Constant(count.type, 8))  # fmt: skip
            builder.store(builder.fadd(builder.load(lanes), magnitudes(offset)), lanes)
        total = builder.load(lanes)
        s = [builder.extract_element(total, ir.Constant(ir.IntType(32), k)) for k in range(8)]
        left = builder.fadd(builder.fadd(s[0], s[1]), builder.fadd(s[2], s[3]))
        right = builder.fadd(builder.fadd(s[4], s[5]), builder.fadd(s[6], s[7]))
        return builder.fadd(left, right)

    return signature, codegen


@njit(cache=True, nogil=True, inline="always")  # called per 128 entries: no call overhead
def _leaf_sum(a: np.ndarray, start: int, n: int) -> float:
    """A leaf of numpy's pairwise sum (`n <= 128`) of the float32 `a`'s magnitudes, in
    float64: 8 running sums combined as a tree (`_leaf_lanes`), then the rest in turn."""
    if n < 8:
        res = 0.0
        for i in range(start, start + n):
            res += _term(a, i)
        return res
    whole = n - n % 8
    res = _leaf_lanes(a, start, whole)
    for i in range(start + whole, start + n):
        res += _term(a, i)
    return res


@intrinsic
def _leaf_lanes2(typingctx, a, a_start, b, b_start, whole, second):
    """`_leaf_lanes` of `a[a_start:]` (returned) and of `b[b_start:]` (into `second[0]`),
    `whole` entries each, in one loop: the two sums' lanes are independent chains of adds,
    so each hides the other's latency; each lane's adds are `_leaf_lanes`' own, in order."""
    ok = (
        _float32_c(a, 1) and _float32_c(b, 1)
        and isinstance(second, types.Array) and second.dtype == types.float64
        and second.layout == "C" and second.ndim == 1
    )  # fmt: skip
    if not ok:
        return None
    signature = types.float64(a, types.intp, b, types.intp, types.intp, second)

    def codegen(context, builder, signature, args):
        first_array, second_array, out = (
            context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 5)
        )
        first_start, second_start, count = args[1], args[3], args[4]
        doubles = ir.VectorType(ir.DoubleType(), 8)
        eight = ir.Constant(count.type, 8)

        def magnitudes(values, start, offset):
            loaded = _load8(builder, values, builder.add(start, offset))
            return builder.fpext(_magnitudes8(builder, loaded), doubles)

        zero = ir.Constant(count.type, 0)
        lanes_a = cgutils.alloca_once_value(builder, magnitudes(first_array, first_start, zero))
        lanes_b = cgutils.alloca_once_value(builder, magnitudes(second_array, second_start, zero))
        steps = builder.sub(builder.udiv(count, eight), ir.Constant(count.type, 1))
        with cgutils.for_range(builder, steps) as loop:
            offset = builder.mul(builder.add(loop.index, ir.Constant(count.type, 1)), eight)
            builder.store(
                builder.fadd(builder.load(lanes_a), magnitudes(first_array, first_start, offset)),
                lanes_a,
            )
            builder.store(
                builder.fadd(builder.load(lanes_b), magnitudes(second_array, second_start, offset)),
                lanes_b,
            )

        def combined(lanes):
            total = builder.load(lanes)
            s = [builder.extract_element(total, ir.Constant(ir.IntType(32), k)) for k in range(8)]
            left = builder.fadd(builder.fadd(s[0], s[1]), builder.fadd(s[2], s[3]))
            right = builder.fadd(builder.fadd(s[4], s[5]), builder.fadd(s[6], s[7]))
            return builder.fadd(left, right)

        builder.store(combined(lanes_b), out.data)
        return combined(lanes_a)

    return signature, codegen


@njit(cache=True, nogil=True, inline="always")
def _leaf_sum2(
    a: np.ndarray, a_start: int, b: np.ndarray, b_start: int, n: int, second: np.ndarray
) -> float:
    """`_leaf_sum` of `a[a_start:]` (returned) and of `b[b_start:]` (into `second[0]`)."""
    whole = n - n % 8
    if whole:
        first = _leaf_lanes2(a, a_start, b, b_start, whole, second)
        other = second[0]
    else:
        first, other = 0.0, 0.0
    for i in range(whole, n):
        first += _term(a, a_start + i)
        other += _term(b, b_start + i)
    second[0] = other
    return first


@njit(cache=True, nogil=True)
def _pairwise_sums(
    a: np.ndarray, a_start: int, b: np.ndarray, b_start: int, n: int, both: bool,
    nodes: np.ndarray, values: np.ndarray, second: np.ndarray,
) -> float:  # fmt: skip
    """numpy's `pairwise_sum` (loops_utils.h) of `float64(|a[a_start:a_start + n]|)`
    (returned) and, if `both`, of `b[b_start:b_start + n]`'s (into `second[0]`) in the same
    walk, leaves side by side (`_leaf_sum2`): halves (cut at a multiple of 8) summed on
    their own and added, down to leaves of <= 128 entries.

    The entries are non-negative (magnitudes), so `abs` changes nothing in float64 and
    turns a float32 row into its magnitudes on the fly. Iterative, on the caller's stacks
    `nodes` (int64 `[_STACK, 3]`) and `values` (float64 `[2, _STACK]`): numba's cache
    cannot always reload a recursive function."""
    top, count = 0, 0
    nodes[0, 0], nodes[0, 1], nodes[0, 2] = 0, n, 0
    while top >= 0:
        start, size, stage = nodes[top, 0], nodes[top, 1], nodes[top, 2]
        if size <= 128:
            if both:
                values[0, count] = _leaf_sum2(a, a_start + start, b, b_start + start, size,
                                              second)  # fmt: skip
                values[1, count] = second[0]
            else:
                values[0, count] = _leaf_sum(a, a_start + start, size)
            count += 1
            top -= 1
            continue
        half = size // 2
        half -= half % 8
        if stage == 2:  # both halves done: left + right
            values[0, count - 2] = values[0, count - 2] + values[0, count - 1]
            values[1, count - 2] = values[1, count - 2] + values[1, count - 1]
            count -= 1
            top -= 1
            continue
        nodes[top, 2] = stage + 1
        top += 1
        if stage == 0:
            nodes[top, 0], nodes[top, 1], nodes[top, 2] = start, half, 0
        else:
            nodes[top, 0], nodes[top, 1], nodes[top, 2] = start + half, size - half, 0
    if both:
        second[0] = values[1, 0]
    return values[0, 0]


@njit(cache=True, nogil=True)
def scaled_task_sum(taus: np.ndarray, scaling: np.float32, out: np.ndarray) -> None:
    """Task arithmetic: `out = scaling * sum_t taus[t]` (float32, task order)."""
    n, numel = taus.shape
    for j in range(numel):
        acc = _F0
        for t in range(n):
            acc += taus[t, j]
        out[j] = acc * scaling


# --- Task arithmetic straight from bf16 bytes ----------------------------------------------
# bf16 is the high half of a float32: widening is a 16-bit shift and a bit cast (exact);
# narrowing rounds to nearest even as torch's CPU cast does, NaN to 0xFFFF (torch's
# vectorized cast; task arithmetic never gets there: its inputs and task sums are checked
# finite and its scaling is finite). Bit casts are LLVM `bitcast`s, so the loops vectorize.
_BF16_BLOCK = 2048


@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_f32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(cache=True, nogil=True, inline="always")
def _widen(bits: np.uint16) -> np.float32:
    return _f32_from_bits(np.uint32(np.uint32(bits) << np.uint32(16)))


@njit(cache=True, nogil=True, inline="always")
def _narrow(value: np.float32) -> np.uint16:
    u = _bits_of_f32(value)
    odd = np.uint32(np.uint32(u >> np.uint32(16)) & np.uint32(1))
    rounded = np.uint32(np.uint32(u + np.uint32(0x7FFF)) + odd) >> np.uint32(16)
    nan = np.uint32(u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.uint16(0xFFFF) if nan else np.uint16(rounded)


@njit(cache=True, nogil=True)
def bf16_round(values: np.ndarray, out: np.ndarray) -> None:
    """float32 `values` to bf16 bits (uint16) `out`, as `tensor.to(torch.bfloat16)`."""
    for j in range(values.shape[0]):
        out[j] = _narrow(values[j])


@njit(cache=True, nogil=True)
def task_arithmetic_bf16(
    pre: np.ndarray, experts: np.ndarray, scaling: np.float32, out: np.ndarray
) -> bool:
    """Task arithmetic on bf16 bits (uint16): `out = bf16(W_pre + scaling * sum_t tau_t)`
    with `tau_t = W_t - W_pre` in float32 and the task sum added in task order from +0, as
    the float32 stream computes it. `pre`, `out`: `[numel]`; `experts`: `[N, numel]`
    (C-contiguous). False if an entry of the task sum is not finite (a nan/inf weight, or
    an overflow): the caller reports it as the stream does."""
    n, numel = experts.shape
    total = np.empty(_BF16_BLOCK, dtype=np.float32)
    bad = np.uint32(0)
    for start in range(0, numel, _BF16_BLOCK):
        width = min(_BF16_BLOCK, numel - start)
        base = pre[start : start + width]
        for j in range(width):
            total[j] = _F0
        for t in range(n):
            row = experts[t, start : start + width]
            for j in range(width):
                total[j] += _widen(row[j]) - _widen(base[j])
        merged = out[start : start + width]
        for j in range(width):
            x = total[j]
            bad |= _bits_of_f32(x - x)  # +0 when finite, nan bits otherwise
            merged[j] = _narrow(_widen(base[j]) + x * scaling)
    return bad == 0


@njit(cache=True, nogil=True)
def ties_merge(
    taus: np.ndarray,
    thresholds: np.ndarray,
    mean: bool,
    scaling: np.float32,
    block: int,
    out: np.ndarray,
) -> None:
    """TIES on `[N, numel]` (C-contiguous): trim (`|tau| >= threshold` of its task, else
    `tau * 0`), elect `gamma = +1` where the trimmed task sum is > 0 else -1, disjoint sum
    (or mean) of the trimmed entries with `trimmed * gamma > 0`, times `scaling` (all
    float32)."""
    n, numel = taus.shape
    total = np.empty(block, dtype=np.float32)
    gamma = np.empty(block, dtype=np.float32)
    count = np.empty(block, dtype=np.int64)
    whole = numel - numel % 8  # 8 entries at a time (`_ties8`), then the rest as below
    for j in range(0, whole, 8):
        _ties8(taus, thresholds, j, mean, scaling, out)
    for start in range(whole, numel, block):
        width = min(block, numel - start)
        for t in range(n):
            limit = thresholds[t]
            for j in range(width):
                x = taus[t, start + j]
                trimmed = x * (_F1 if abs(x) >= limit else _F0)
                total[j] = (_F0 if t == 0 else total[j]) + trimmed
        for j in range(width):
            gamma[j] = _F1 if total[j] > 0 else _FM1
        for t in range(n):
            limit = thresholds[t]
            for j in range(width):
                x = taus[t, start + j]
                trimmed = x * (_F1 if abs(x) >= limit else _F0)
                agree = trimmed * gamma[j] > 0
                kept = trimmed * (_F1 if agree else _F0)
                if t == 0:
                    total[j], count[j] = _F0, 0
                total[j] += kept
                count[j] += 1 if agree else 0
        for j in range(width):
            value = total[j]
            if mean:
                value = value / np.float32(max(count[j], 1)) if count[j] > 0 else _F0
            out[start + j] = value * scaling


@njit(cache=True, nogil=True)
def _elect_block(
    taus: np.ndarray, start: int, width: int, work: np.ndarray, out: np.ndarray
) -> None:
    """EMR's election (`magnitude=max`) of entries `start .. start + width` into `out`:
    `max_t tau_t` where the task sum is > 0, else `min_t tau_t` if < 0, else -0.0."""
    n = taus.shape[0]
    total, high, low = work[0], work[1], work[2]
    row = taus[0, start : start + width]
    for j in range(width):
        x = row[j]
        total[j], high[j], low[j] = x, x, x
    for t in range(1, n):
        row = taus[t, start : start + width]
        for j in range(width):
            x = row[j]
            total[j] += x
            h, lo = high[j], low[j]
            high[j] = x if x > h else h
            low[j] = x if x < lo else lo
    chosen = out[start : start + width]
    for j in range(width):
        # low = -0.0 gives -0.0 either way: the sign of a zero max/min never shows.
        lo = low[j]
        negative = lo if lo < 0 else np.float32(-0.0)
        chosen[j] = high[j] if total[j] > 0 else negative


@njit(cache=True, nogil=True)
def _elect_sum_block(
    taus: np.ndarray, start: int, width: int, work: np.ndarray, out: np.ndarray
) -> None:
    """The BEiT-3 election (`magnitude=sum`): `flag = +1` where the task sum is > 0 else -1,
    `eps = sum_t max(tau_t * flag, 0)` from +0 in task order, `out = eps * flag`."""
    n = taus.shape[0]
    total, flag, eps = work[0], work[1], work[2]
    row = taus[0, start : start + width]
    for j in range(width):
        total[j] = row[j]
    for t in range(1, n):
        row = taus[t, start : start + width]
        for j in range(width):
            total[j] += row[j]
    for j in range(width):
        flag[j] = _F1 if total[j] > 0 else _FM1
        eps[j] = _F0
    for t in range(n):
        row = taus[t, start : start + width]
        for j in range(width):
            agreeing = row[j] * flag[j]
            eps[j] += agreeing if agreeing > 0 else _F0
    chosen = out[start : start + width]
    for j in range(width):
        chosen[j] = eps[j] * flag[j]


# `modulate`'s election: none (`unified` is given), EMR's max, or the BEiT-3 sum.
ELECT_NONE = 0
ELECT_MAX = 1
ELECT_SUM = 2


@njit(cache=True, nogil=True)
def modulate(
    taus: np.ndarray,
    unified: np.ndarray,
    elect: int,
    mask: bool,
    rescale: bool,
    sum_block: int,
    packed: np.ndarray,
    numerator: np.ndarray,
    denominator: np.ndarray,
) -> None:
    """Mask & Rescale of one key (or row block) `[N, numel]` against `unified` `[numel]`
    (written first by the election `elect`, if any): `packed[t]` gets the bits of
    `sgn(tau_t) * sgn(tau_uni) > 0` (little bit order, 8 entries a byte), and, if `rescale`,
    `numerator[t] += sum|tau_t|`, `denominator[t] += sum|M_t * tau_uni|` (or `sum|tau_uni|`
    without masks) in float64, added block by block as the numpy kernel did (`sum_block`
    entries each, a multiple of 8)."""
    n, numel = taus.shape
    work = np.empty((3, _BLOCK), dtype=np.float32)
    masked = np.empty(_CAST_CHUNK, dtype=np.float32)
    nodes = np.empty((_STACK, 3), dtype=np.int64)
    values = np.empty((2, _STACK), dtype=np.float64)
    second = np.empty(1, dtype=np.float64)
    for block in range(0, numel, sum_block):
        stop = min(numel, block + sum_block)
        if elect != ELECT_NONE:
            for start in range(block, stop, _BLOCK):
                width = min(_BLOCK, stop - start)
                if elect == ELECT_MAX:
                    _elect_block(taus, start, width, work, unified)
                else:
                    _elect_sum_block(taus, start, width, work, unified)
        for t in range(n):
            row = taus[t]
            # numpy summed each block's row one cast buffer (chunk) at a time, from 0.
            block_numerator, block_denominator = 0.0, 0.0
            for chunk in range(block, stop, _CAST_CHUNK):
                width = min(_CAST_CHUNK, stop - chunk)
                if mask:
                    part, uni = row[chunk : chunk + width], unified[chunk : chunk + width]
                    for j in range(width):
                        x, y = part[j], uni[j]
                        # |tau_uni| * M_t: |tau_uni| or +0.0 (exact in float32); it is > 0
                        # exactly where M_t = 1 (the mask needs tau_uni != 0).
                        same = ((x > 0) & (y > 0)) | ((x < 0) & (y < 0))
                        masked[j] = abs(y) if same else _F0
                    _pack(masked, width, packed[t], chunk // 8)
                if rescale:  # with masks, both sums in one walk
                    block_numerator += _pairwise_sums(row, chunk, masked, 0, width, mask, nodes,
                                                      values, second)  # fmt: skip
                    if mask:
                        block_denominator += second[0]
            numerator[t] += block_numerator
            if mask:
                denominator[t] += block_denominator
        if rescale and not mask:
            plain = 0.0
            for chunk in range(block, stop, _CAST_CHUNK):
                width = min(_CAST_CHUNK, stop - chunk)
                plain += _pairwise_sums(unified, chunk, unified, chunk, width, False, nodes,
                                        values, second)  # fmt: skip
            for t in range(n):
                denominator[t] += plain


@njit(cache=True, nogil=True)
def _pack(masked: np.ndarray, width: int, out: np.ndarray, first: int) -> None:
    """`np.packbits(masked[:width] > 0, bitorder="little")` into `out[first:]`."""
    whole = width // 8
    for b in range(whole):
        i = 8 * b
        out[first + b] = (
            np.int64(masked[i] > 0)
            | (np.int64(masked[i + 1] > 0) << 1)
            | (np.int64(masked[i + 2] > 0) << 2)
            | (np.int64(masked[i + 3] > 0) << 3)
            | (np.int64(masked[i + 4] > 0) << 4)
            | (np.int64(masked[i + 5] > 0) << 5)
            | (np.int64(masked[i + 6] > 0) << 6)
            | (np.int64(masked[i + 7] > 0) << 7)
        )
    if whole * 8 < width:  # the last, partial byte: zero bits after the end
        byte = 0
        for i in range(whole * 8, width):
            byte |= np.int64(masked[i] > 0) << (i - whole * 8)
        out[first + whole] = byte


@njit(cache=True, nogil=True)
def drop_and_rescale(
    row: np.ndarray, words: np.ndarray, threshold: np.int64, rescale: bool, keep: np.float32
) -> None:
    """DARE on one task row, in place: `row[i] *= (words[i] >= threshold)`, then divided by
    `keep = 1 - p` (float32) if `rescale`."""
    for i in range(row.shape[0]):
        x = row[i] * (_F1 if np.int64(words[i]) >= threshold else _F0)
        row[i] = x / keep if rescale else x


@njit(cache=True, nogil=True)
def high_counts(bits: np.ndarray, counts: np.ndarray) -> None:
    """Radix select pass 1: `counts[r, b] +=` the entries of row r (float32 bits as uint32)
    whose |value|'s high 16 bits are b."""
    rows, numel = bits.shape
    for r in range(rows):
        for i in range(numel):
            counts[r, (bits[r, i] >> 16) & 0x7FFF] += 1


@njit(cache=True, nogil=True)
def low_counts(bits: np.ndarray, tops: np.ndarray, counts: np.ndarray) -> None:
    """Radix select pass 2: `counts[r, b] +=` the entries of row r in the high-bits bin
    `tops[r]` whose low 16 bits are b."""
    rows, numel = bits.shape
    for r in range(rows):
        top = tops[r]
        for i in range(numel):
            value = bits[r, i]
            if ((value >> 16) & 0x7FFF) == top:
                counts[r, value & 0xFFFF] += 1


# --- DARE's draws: numpy's Philox-4x64-10, generated in the kernel ---------------------------
# The constants and rounds of Random123's Philox-4x64 (numpy.random.Philox). `random_raw`
# bumps its counter before each block, so block `b` of the stream from counter 0 is the
# generator applied to counter `b + 1`, whose 4 uint64 outputs are the 32-bit words of
# entries `8b .. 8b + 7` (low half first).
_PHILOX_M0 = np.uint64(0xD2E7470EE14C6C93)
_PHILOX_M1 = np.uint64(0xCA5A826395121157)
_PHILOX_W0 = np.uint64(0x9E3779B97F4A7C15)
_PHILOX_W1 = np.uint64(0xBB67AE8584CAA73B)
_LOW32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)


@intrinsic
def _mulhilo64(typingctx, a, b):
    """The high and low 64 bits of the 128-bit product of two uint64 (one `mul` on x86-64)."""
    signature = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        wide, narrow = ir.IntType(128), ir.IntType(64)
        product = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
        high = builder.trunc(builder.lshr(product, ir.Constant(wide, 64)), narrow)
        return context.make_tuple(
            builder, signature.return_type, [high, builder.trunc(product, narrow)]
        )

    return signature, codegen


@njit(cache=True, nogil=True, inline="always")
def _philox_block(block: np.uint64, k0: np.uint64, k1: np.uint64) -> tuple:
    """The 4 uint64 outputs of block `block` (counter `block + 1`, below 2^64) of
    `numpy.random.Philox(key=[k0, k1])`: 10 rounds, the key bumped before rounds 1-9."""
    c0, c1, c2, c3 = block + np.uint64(1), np.uint64(0), np.uint64(0), np.uint64(0)
    for r in range(10):
        if r > 0:
            k0 += _PHILOX_W0
            k1 += _PHILOX_W1
        hi0, lo0 = _mulhilo64(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo64(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


# Blocks of words drawn at a time: independent blocks (the CPU overlaps their rounds), then
# one vectorized drop over their words (`drop_and_rescale`).
_DRAW_BLOCKS = 512


@njit(cache=True, nogil=True)
def philox_drop_and_rescale(
    row: np.ndarray,
    k0: np.uint64,
    k1: np.uint64,
    start: int,
    threshold: np.int64,
    rescale: bool,
    keep: np.float32,
) -> None:
    """`drop_and_rescale` with its words drawn here: entry `i` of `row` is entry
    `start + i` of its key, whose word is 32-bit word `start + i` of
    `Philox(key=[k0, k1]).random_raw` from counter 0 (see `_philox_block`)."""
    n = row.shape[0]
    words = np.empty(_DRAW_BLOCKS * 8, dtype=np.uint32)
    i = 0
    while i < n:
        first, skip = (start + i) // 8, (start + i) % 8
        count = min(_DRAW_BLOCKS * 8 - skip, n - i)
        for b in range((skip + count + 7) // 8):
            v0, v1, v2, v3 = _philox_block(np.uint64(first + b), k0, k1)
            w = 8 * b
            words[w], words[w + 1] = np.uint32(v0 & _LOW32), np.uint32(v0 >> _U32)
            words[w + 2], words[w + 3] = np.uint32(v1 & _LOW32), np.uint32(v1 >> _U32)
            words[w + 4], words[w + 5] = np.uint32(v2 & _LOW32), np.uint32(v2 >> _U32)
            words[w + 6], words[w + 7] = np.uint32(v3 & _LOW32), np.uint32(v3 >> _U32)
        drop_and_rescale(row[i : i + count], words[skip : skip + count], threshold, rescale, keep)
        i += count


@njit(cache=True, nogil=True)
def _noop(values: np.ndarray) -> int:
    return values.shape[0]


_warm = False


def warm_up() -> None:
    """Load numba's compiler state (its first call in a process imports and registers
    thousands of objects, about half a second) with the garbage collector paused: collecting
    then would walk every object of torch and numba at each full collection. Idempotent."""
    global _warm
    if _warm:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        # On a fresh cache this compiles: a Ctrl-C meanwhile would land in llvmlite's ctypes
        # callback and be dropped (the merge went on and exited 0), so it waits for the end.
        with interrupts_deferred():
            _noop(np.empty(0, dtype=np.float32))
    finally:
        if enabled:
            gc.enable()
    _warm = True


# --- Span kernels: raw checkpoint entries in, outputs out, in the cache ---------------------
_EXPONENT = np.uint32(0x7F800000)
_MAGNITUDE = np.uint32(0x7FFFFFFF)


@njit(cache=True, nogil=True, inline="always")
def _all_finite(sums: np.ndarray, width: int) -> bool:
    """Whether none of `sums[:width]` (float32) has its exponent bits all set (inf or nan);
    branch-free, so the loop vectorizes."""
    infinite = np.uint32(0)
    for j in range(width):
        infinite |= np.uint32((_bits_of_f32(sums[j]) & _EXPONENT) == _EXPONENT)
    return infinite == 0


@njit(cache=True, nogil=True)
def subtract_and_check(
    pre: np.ndarray, rows: np.ndarray, start: int, width: int, total: np.ndarray
) -> bool:
    """`rows[:, start:start + width] -= pre[start:start + width]` (the fine-tuned entries
    become task vectors, float32, as the stream's `finetuned.sub_(pretrained)`), and whether
    every task sum `((0 + tau_0) + tau_1) + ...` of those entries is finite (the stream's
    check: a nan/inf in a checkpoint, or task vectors that overflow). `total`: at least
    `width` float32 entries of work space. Row by row, so that the loops vectorize."""
    n = rows.shape[0]
    base = pre[start : start + width]
    sums = total[:width]
    for j in range(width):
        sums[j] = _F0
    for t in range(n):
        row = rows[t, start : start + width]
        for j in range(width):
            x = row[j] - base[j]
            row[j] = x
            sums[j] += x
    return _all_finite(sums, width)


@intrinsic
def _subtract_elect8(typingctx, pre, rows, j, out):
    """`subtract_and_check` and `_elect_block`'s max election of entries `j .. j + 7` in
    one go: every task row of the C-contiguous float32 `rows` `[N, width]` becomes its task
    vector there (`rows[t, j] -= pre[j]`), `out[j:j + 8]` gets the election (per entry
    `_elect_block`'s arithmetic: the running max and min with the same comparisons), and
    the result's 8 low bits say which lanes' task sum `((0 + tau_0) + tau_1) + ...` is not
    finite; 8 entries per instruction. One sum from +0 serves both: the election's, from
    `tau_0`, differs only in the sign of a zero sum, which `> 0` does not see."""
    if not (_float32_c(pre, 1) and _float32_c(rows, 2) and _float32_c(out, 1)):
        return None

    def codegen(context, builder, signature, args):
        base_array, taus, chosen = (
            context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 1, 3)
        )
        count, width = cgutils.unpack_tuple(builder, taus.shape, 2)
        j = args[2]
        base = _load8(builder, base_array, j)

        def task_vector(task):
            at = builder.gep(taus.data, [builder.add(builder.mul(task, width), j)])
            where = builder.bitcast(at, _FLOATS8.as_pointer())
            tau = builder.fsub(builder.load(where, align=4), base)
            builder.store(tau, where, align=4)
            return tau

        first = task_vector(ir.Constant(count.type, 0))
        total = cgutils.alloca_once_value(builder, builder.fadd(_splat(0.0), first))
        high, low = (cgutils.alloca_once_value(builder, first) for _ in range(2))
        with cgutils.for_range(builder, builder.sub(count, ir.Constant(count.type, 1))) as loop:
            x = task_vector(builder.add(loop.index, ir.Constant(count.type, 1)))
            builder.store(builder.fadd(builder.load(total), x), total)
            h, lo = builder.load(high), builder.load(low)
            builder.store(builder.select(builder.fcmp_ordered(">", x, h), x, h), high)
            builder.store(builder.select(builder.fcmp_ordered("<", x, lo), x, lo), low)
        lo, summed = builder.load(low), builder.load(total)
        negative = builder.select(builder.fcmp_ordered("<", lo, _splat(0.0)), lo, _splat(-0.0))
        positive = builder.fcmp_ordered(">", summed, _splat(0.0))
        where = builder.gep(chosen.data, [j])
        builder.store(builder.select(positive, builder.load(high), negative),
                      builder.bitcast(where, _FLOATS8.as_pointer()), align=4)  # fmt: skip
        exponent = ir.Constant(_WORDS8, [0x7F800000] * 8)
        infinite = builder.icmp_unsigned(
            "==", builder.and_(builder.bitcast(summed, _WORDS8), exponent), exponent
        )
        return builder.zext(builder.bitcast(infinite, ir.IntType(8)), ir.IntType(32))

    return types.uint32(pre, rows, types.intp, out), codegen


@intrinsic
def _mask8(typingctx, row, unified, j, masked, packed, byte):
    """Masks of entries `j .. j + 7`: `M = sgn(tau) * sgn(tau_uni) > 0` (compared, never
    multiplied), `masked[j - start ...]` = `|tau_uni|` where `M` else +0.0 (what `_pack` and
    the denominator's pairwise sum read), and `packed[byte]` = `M`'s 8 bits, entry `j` in
    the lowest (`np.packbits(..., bitorder="little")`). `masked` is indexed from `j`'s
    chunk: the caller passes `j` and `masked`'s own offset via `byte` (see `_mask_pack`)."""
    ok = all(
        isinstance(a, types.Array) and a.layout == "C" and a.ndim == 1
        for a in (row, unified, masked, packed)
    ) and packed.dtype == types.uint8  # fmt: skip
    if not ok:
        return None

    def codegen(context, builder, signature, args):
        x_array, y_array, masked_array, packed_array = (
            context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 1, 3, 4)
        )
        j, byte = args[2], args[5]
        x, y = _load8(builder, x_array, j), _load8(builder, y_array, j)
        zero = _splat(0.0)
        both_positive = builder.and_(builder.fcmp_ordered(">", x, zero),
                                     builder.fcmp_ordered(">", y, zero))  # fmt: skip
        both_negative = builder.and_(builder.fcmp_ordered("<", x, zero),
                                     builder.fcmp_ordered("<", y, zero))  # fmt: skip
        same = builder.or_(both_positive, both_negative)
        magnitude = _magnitudes8(builder, y)
        where = builder.gep(masked_array.data, [builder.mul(byte, ir.Constant(byte.type, 8))])
        builder.store(builder.select(same, magnitude, zero),
                      builder.bitcast(where, _FLOATS8.as_pointer()), align=4)  # fmt: skip
        bits = builder.bitcast(same, ir.IntType(8))
        builder.store(bits, builder.gep(packed_array.data, [byte]))
        return context.get_dummy_value()

    return types.void(row, unified, types.intp, masked, packed, types.intp), codegen


def _broadcast8(builder, value, vector=_FLOATS8):
    """An 8-lane `vector` (float32 or int32 lanes) holding `value` in every lane."""
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value,
                                 ir.Constant(ir.IntType(32), 0))  # fmt: skip
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))


@intrinsic
def _ties8(typingctx, taus, thresholds, j, mean, scaling, out):
    """`ties_merge` of entries `j .. j + 7` of the C-contiguous float32 `taus` `[N, width]`
    into `out[j:j + 8]`: the same float32 operations per entry in the same order (trim by
    multiplying with 1 or 0, the trimmed task sum from +0, gamma, the agreeing sum from +0
    and its count, the mean's division), 8 entries per instruction."""
    ok = (
        _float32_c(taus, 2) and _float32_c(out, 1)
        and isinstance(thresholds, types.Array) and thresholds.dtype == types.float32
    )  # fmt: skip
    if not ok:
        return None

    def codegen(context, builder, signature, args):
        rows = context.make_array(signature.args[0])(context, builder, args[0])
        limits = context.make_array(signature.args[1])(context, builder, args[1])
        merged = context.make_array(signature.args[5])(context, builder, args[5])
        count, width = cgutils.unpack_tuple(builder, rows.shape, 2)
        j, mean, scaling = args[2], args[3], args[4]
        zero, one = _splat(0.0), _splat(1.0)

        def trimmed(task):
            x = _load8(builder, rows, builder.add(builder.mul(task, width), j))
            limit = _broadcast8(builder, builder.load(cgutils.get_item_pointer(
                context, builder, signature.args[1], limits, [task])))  # fmt: skip
            size = _magnitudes8(builder, x)
            return builder.fmul(x, builder.select(builder.fcmp_ordered(">=", size, limit), one,
                                                  zero))  # fmt: skip

        total = cgutils.alloca_once_value(builder, zero)
        with cgutils.for_range(builder, count) as loop:
            builder.store(builder.fadd(builder.load(total), trimmed(loop.index)), total)
        gamma = builder.select(builder.fcmp_ordered(">", builder.load(total), zero), one,
                               _splat(-1.0))  # fmt: skip
        kept_sum = cgutils.alloca_once_value(builder, zero)
        agreeing = cgutils.alloca_once_value(builder, ir.Constant(_WORDS8, [0] * 8))
        with cgutils.for_range(builder, count) as loop:
            value = trimmed(loop.index)
            agree = builder.fcmp_ordered(">", builder.fmul(value, gamma), zero)
            kept = builder.fmul(value, builder.select(agree, one, zero))
            builder.store(builder.fadd(builder.load(kept_sum), kept), kept_sum)
            builder.store(builder.add(builder.load(agreeing), builder.zext(agree, _WORDS8)),
                          agreeing)  # fmt: skip
        result = builder.load(kept_sum)
        counts = builder.load(agreeing)
        some = builder.icmp_signed(">", counts, ir.Constant(_WORDS8, [0] * 8))
        averaged = builder.select(some, builder.fdiv(result, builder.sitofp(counts, _FLOATS8)),
                                  zero)  # fmt: skip
        result = builder.select(mean, averaged, result)
        where = builder.gep(merged.data, [j])
        builder.store(builder.fmul(result, _broadcast8(builder, scaling)),
                      builder.bitcast(where, _FLOATS8.as_pointer()), align=4)  # fmt: skip
        return context.get_dummy_value()

    signature = types.void(taus, thresholds, types.intp, types.boolean, types.float32, out)
    return signature, codegen


@njit(cache=True, nogil=True)
def _mask_pack(
    row: np.ndarray, unified: np.ndarray, start: int, size: int, masked: np.ndarray,
    packed: np.ndarray, first: int,
) -> None:  # fmt: skip
    """The mask loop of `modulate` and `_pack` for entries `start .. start + size` of a
    task row: `masked[:size]` and packed bytes `packed[first ...]`, whole bytes 8 lanes at a
    time (`_mask8`), a last partial byte as `_pack` does."""
    whole = size - size % 8
    for b in range(whole // 8):
        # `_mask8` writes masked[8 * b ...] and packed[first + b]: pass views that line up.
        _mask8(row[start:], unified[start:], 8 * b, masked, packed[first:], b)
    if whole < size:
        byte = 0
        for i in range(whole, size):
            x, y = row[start + i], unified[start + i]
            same = ((x > 0) & (y > 0)) | ((x < 0) & (y < 0))
            masked[i] = abs(y) if same else _F0
            byte |= np.int64(masked[i] > 0) << (i - whole)
        packed[first + whole // 8] = byte


@njit(cache=True, nogil=True)
def emr_span(
    pre: np.ndarray,
    rows: np.ndarray,
    elect: int,
    mask: bool,
    rescale: bool,
    unified: np.ndarray,
    packed: np.ndarray,
    chunk_numerator: np.ndarray,
    chunk_denominator: np.ndarray,
) -> bool:
    """`modulate` with its election (`elect` max or sum; none: `unified` is given) on a span
    of raw entries: `pre`
    `[width]` and the fine-tuned `rows` `[N, width]` (overwritten by the task vectors), one
    `_CAST_CHUNK` chunk at a time while it is in the cache. The span starts on a chunk of
    its key (or row block), so chunk `c` here is one of `modulate`'s chunks; instead of
    adding the float64 sums up, it stores each chunk's: `chunk_numerator[t, c]` =
    `pairwise(|tau_t|)`, `chunk_denominator[t, c]` = `pairwise(M_t * |tau_uni|)`, or, without
    masks, `chunk_denominator[0, c]` = `pairwise(|tau_uni|)` (`add_chunk_sums` adds them up
    in `modulate`'s order). False (and the outputs unfinished) if a task sum is not finite."""
    n, width = rows.shape
    work = np.empty((3, _BLOCK), dtype=np.float32)
    masked = np.empty(_CAST_CHUNK, dtype=np.float32)
    sums = np.empty(_CAST_CHUNK, dtype=np.float32)
    nodes = np.empty((_STACK, 3), dtype=np.int64)
    values = np.empty((2, _STACK), dtype=np.float64)
    second = np.empty(1, dtype=np.float64)
    for chunk in range(0, width, _CAST_CHUNK):
        size = min(_CAST_CHUNK, width - chunk)
        if elect == ELECT_MAX:  # the subtraction and the election in one pass, 8 lanes
            whole = size - size % 8
            infinite = np.uint32(0)
            for j in range(chunk, chunk + whole, 8):
                infinite |= _subtract_elect8(pre, rows, j, unified)
            if infinite or not subtract_and_check(pre, rows, chunk + whole, size - whole, sums):
                return False
            if whole < size:
                _elect_block(rows, chunk + whole, size - whole, work, unified)
        elif not subtract_and_check(pre, rows, chunk, size, sums):
            return False
        elif elect == ELECT_SUM:
            for start in range(chunk, chunk + size, _BLOCK):
                _elect_sum_block(rows, start, min(_BLOCK, chunk + size - start), work, unified)
        index = chunk // _CAST_CHUNK
        for t in range(n):
            row = rows[t]
            if mask:
                _mask_pack(row, unified, chunk, size, masked, packed[t], chunk // 8)
            if rescale:  # with masks, both sums in one walk
                chunk_numerator[t, index] = _pairwise_sums(row, chunk, masked, 0, size, mask,
                                                           nodes, values, second)  # fmt: skip
                if mask:
                    chunk_denominator[t, index] = second[0]
        if rescale and not mask:
            chunk_denominator[0, index] = _pairwise_sums(unified, chunk, unified, chunk, size,
                                                         False, nodes, values, second)  # fmt: skip
    return True


@njit(cache=True, nogil=True)
def add_chunk_sums(chunk_sums: np.ndarray, chunks_per_block: int, out: np.ndarray) -> None:
    """`out[t] += sum_blocks (((0 + c_0) + c_1) + ...)` over each block's chunk sums, blocks
    in order: how `modulate` adds its chunks' float64 sums (`sum_block` entries a block)."""
    n, count = chunk_sums.shape
    for t in range(n):
        for first in range(0, count, chunks_per_block):
            block = 0.0
            for c in range(first, min(count, first + chunks_per_block)):
                block += chunk_sums[t, c]
            out[t] += block


@njit(cache=True, nogil=True)
def task_arithmetic_span(
    pre: np.ndarray,
    rows: np.ndarray,
    scaling: np.float32,
    first: int,
    drop: bool,
    keys: np.ndarray,
    threshold: np.int64,
    rescale: bool,
    keep: np.float32,
    out: np.ndarray,
) -> bool:
    """Task arithmetic, optionally on DARE's dropped task vectors, on a span of raw entries:
    `pre` `[width]`, the fine-tuned `rows` `[N, width]` (overwritten), `out` `[width]` gets
    `W_pre + scaling * sum_t tau'_t` (float32, the task sum from +0 in task order, as the
    stream). With `drop`, task `t`'s entries go through `philox_drop_and_rescale` with the
    Philox key `keys[t]` (uint64 pairs), the span being entries `first ...` of its key.
    False if a task sum before the drop is not finite (the stream's check)."""
    n, width = rows.shape
    sums = np.empty(_CAST_CHUNK, dtype=np.float32)
    for chunk in range(0, width, _CAST_CHUNK):
        size = min(_CAST_CHUNK, width - chunk)
        if not subtract_and_check(pre, rows, chunk, size, sums):
            return False
        total = sums[:size]  # the task sum `subtract_and_check` left: the merge's, undropped
        if drop:  # the sum of the dropped task vectors instead, in the same order
            for t in range(n):
                philox_drop_and_rescale(rows[t, chunk : chunk + size], keys[t, 0], keys[t, 1],
                                        first + chunk, threshold, rescale, keep)  # fmt: skip
            for j in range(size):
                total[j] = _F0
            for t in range(n):
                row = rows[t, chunk : chunk + size]
                for j in range(size):
                    total[j] += row[j]
        base, merged = pre[chunk : chunk + size], out[chunk : chunk + size]
        for j in range(size):
            merged[j] = base[j] + total[j] * scaling
    return True


@intrinsic
def _window8(typingctx, raw, row, j, low, high, width, sums):
    """Entries `j .. j + 7` of task row `row` of the raw span `raw` `[N + 1, width]` (row 0
    the pretrained entries): `tau = raw[row] - raw[0]` (float32), added into `sums[j ...]`,
    and of `|tau|`'s bits `v` (sign cleared) the lanes with `v - low < width` (unsigned: in
    the window) as the low 8 bits of the result, entry `j` lowest, and how many lanes have
    `v >= high` in bits 8 and up."""
    if not (_float32_c(raw, 2) and _float32_c(sums, 1)):
        return None
    word = types.uint32
    signature = word(raw, types.intp, types.intp, word, word, word, sums)

    def codegen(context, builder, signature, args):
        rows = context.make_array(signature.args[0])(context, builder, args[0])
        total = context.make_array(signature.args[6])(context, builder, args[6])
        _, columns = cgutils.unpack_tuple(builder, rows.shape, 2)
        j = args[2]
        tau = builder.fsub(_load8(builder, rows, builder.add(builder.mul(args[1], columns), j)),
                           _load8(builder, rows, j))  # fmt: skip
        where = builder.bitcast(builder.gep(total.data, [j]), _FLOATS8.as_pointer())
        builder.store(builder.fadd(builder.load(where, align=4), tau), where, align=4)
        bits = builder.and_(builder.bitcast(tau, _WORDS8), ir.Constant(_WORDS8, [0x7FFFFFFF] * 8))
        above = builder.icmp_unsigned(">=", bits, _broadcast8(builder, args[4], _WORDS8))
        inside = builder.icmp_unsigned("<", builder.sub(bits, _broadcast8(builder, args[3], _WORDS8)),
                                       _broadcast8(builder, args[5], _WORDS8))  # fmt: skip
        i32 = ir.IntType(32)
        popcount = builder.module.declare_intrinsic("llvm.ctpop", [i32])
        count = builder.call(popcount, [builder.zext(builder.bitcast(above, ir.IntType(8)), i32)])
        lanes = builder.zext(builder.bitcast(inside, ir.IntType(8)), i32)
        return builder.or_(lanes, builder.shl(count, ir.Constant(i32, 8)))

    return signature, codegen


@njit(cache=True, nogil=True)
def window_counts(
    raw: np.ndarray, lows: np.ndarray, window: np.ndarray, above: np.ndarray, sums: np.ndarray
) -> bool:
    """One pass of TIES' sampled select over a raw span `raw` `[N + 1, width]` (the
    pretrained entries, then the fine-tuned ones; float32, left as they are): for each task
    t, with `v` the bits of `|tau_t|` (`tau_t = raw[t + 1] - raw[0]`, sign cleared),
    `window[t, v - lows[t]] += 1` for `lows[t] <= v < lows[t] + W` (`W = window.shape[1]`)
    and `above[t] +=` the count of `v >= lows[t] + W`. The k-th largest lies in the window
    when `above[t] < k <= above[t] + window[t].sum()`, and is then read off it exactly.

    Also whether every task sum `((0 + tau_0) + tau_1) + ...` is finite (as
    `subtract_and_check`; `sums`: at least `width` float32 entries of work space). 8 lanes
    at a time (`_window8`): entries in a window are rare, so only their lanes go one by one."""
    n = raw.shape[0] - 1
    width = raw.shape[1]
    size = np.uint32(window.shape[1])
    base = raw[0]
    whole = width - width % 8
    for j in range(width):
        sums[j] = _F0
    for t in range(n):
        row = raw[t + 1]
        low = np.uint32(lows[t])
        high = np.uint32(low + size)
        counts = window[t]
        count = 0
        for j in range(0, whole, 8):
            found = _window8(raw, t + 1, j, low, high, size, sums)
            count += found >> np.uint32(8)
            lanes = found & np.uint32(0xFF)
            if lanes:
                for lane in range(8):
                    if (lanes >> np.uint32(lane)) & np.uint32(1):
                        value = _bits_of_f32(row[j + lane] - base[j + lane]) & _MAGNITUDE
                        counts[np.uint32(value - low)] += 1
        for j in range(whole, width):
            tau = row[j] - base[j]
            sums[j] += tau
            value = _bits_of_f32(tau) & _MAGNITUDE
            count += np.int64(value >= high)
            offset = np.uint32(value - low)
            if offset < size:
                counts[offset] += 1
        above[t] += count
    return _all_finite(sums, width)
