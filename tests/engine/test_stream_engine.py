"""The streaming engine: positional safetensors reads, the parallel `map`, task-order sums,
and the CPU kernels (numpy) against the device-agnostic torch formulas they replace."""

from __future__ import annotations

import json
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

import mergebench
import mergebench.methods.modulators as modulators
import mergebench.methods.ties as ties
from mergebench.engine.bits import _pack_bits_torch, _unpack_bits_torch, pack_bits, unpack_bits
from mergebench.engine.checkpoints import open_checkpoint
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import Scratch, TaskVectorStream, sum_tasks
from mergebench.methods.emr import elect
from mergebench.util.errors import MergeBenchError


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def pool_of(num_tasks: int = 4, seed: int = 0) -> ModelPool:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (50, 40), "b": (7,), "c": (3, 5, 2), "d": (1,)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    finetuned = {
        f"t{i}": {k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()}
        for i in range(num_tasks)
    }
    return ModelPool.from_checkpoints(pre, finetuned)


# --- safetensors reads --------------------------------------------------------------------
def test_reads_by_offset_match_safetensors_for_every_dtype(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(4).double(),
        "i64": torch.arange(6),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    source = open_checkpoint(tmp_path / "x.safetensors")
    for key, value in tensors.items():
        got = source.get(key)
        assert got.dtype == value.dtype and got.shape == value.shape
        assert torch.equal(got, value), key
    # read_into converts to the buffer's dtype (what the stream does with bf16/f16 models).
    out = torch.empty(2, 3)
    source.read_into("bf16", out)
    assert torch.equal(out, tensors["bf16"].float())
    with pytest.raises(MergeBenchError, match="'f32' has shape \\[3, 4\\], buffer has 5"):
        source.read_into("f32", torch.empty(5))


def test_converting_reads_go_chunk_by_chunk_through_one_staging_buffer(tmp_path, monkeypatch):
    """bf16/f16 weights into float32 buffers: read and converted in small chunks (a chunk
    that is not a whole number of rows, a last chunk shorter than the others), the same
    numbers as a whole read, for whole keys and row blocks."""
    import mergebench.engine.safetensors_reader as reader_module

    monkeypatch.setattr(reader_module, "_STAGING_BYTES", 22)  # 11 bf16 entries per chunk
    monkeypatch.setattr(reader_module, "_staging_local", threading.local())
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(9, 7, generator=g).bfloat16(),
        "f16": torch.randn(5, 3, generator=g).half(),
        "f32": torch.randn(4, 6, generator=g),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    source = open_checkpoint(tmp_path / "x.safetensors")
    for key, value in tensors.items():
        for dtype in (torch.float32, torch.float64):
            out = source.read_into(key, torch.empty(value.shape, dtype=dtype))
            assert torch.equal(out, value.to(dtype)), (key, dtype)
            rows = source.read_rows_into(key, torch.empty(2, value.shape[1], dtype=dtype), 2)
            assert torch.equal(rows, value[2:4].to(dtype)), (key, dtype)
        strided = torch.empty(value.shape[1], value.shape[0]).t()  # not contiguous
        assert torch.equal(source.read_into(key, strided), value.float()), key
    staging = reader_module._staging_local.buffer
    assert staging.numel() <= 22  # one small buffer, whatever the key's size


def _write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "outside"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "16 bytes"),
        ({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed entry"),
    ],
)
def test_bad_safetensors_headers_are_named(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(MergeBenchError, match=f"bad.safetensors.*{message}"):
        open_checkpoint(path)


def test_a_header_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\0" * 8)
    with pytest.raises(MergeBenchError, match="bad.safetensors.*invalid JSON"):
        open_checkpoint(path)


# --- the parallel map ---------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_map_gives_every_key_in_order_with_the_right_task_vectors(threads):
    pool = pool_of()
    stream = TaskVectorStream(pool, progress=False, threads=threads)
    expected = {
        k: torch.stack([ft.get(k) - pool.pretrained.get(k) for ft in pool.finetuned.values()])
        for k in pool.pretrained.keys()
    }
    torch_threads = torch.get_num_threads()
    seen = list(stream.map(lambda item: (item.task_vectors.clone(), item.task_sum().clone())))
    assert [key for key, _ in seen] == list(expected)
    for key, (taus, total) in seen:
        assert torch.equal(taus, expected[key])
        assert torch.equal(total, sum_tasks(expected[key]))
    assert torch.get_num_threads() == torch_threads  # restored after the pass


def test_a_second_map_pass_reads_into_the_first_pass_buffers():
    """Passes share their buffer sets (no fresh pages per pass) and still see every key's
    own task vectors."""
    pool = pool_of()
    stream = TaskVectorStream(pool, progress=False, threads=2)

    def pointers_and_values(item):
        return item.task_vectors.data_ptr(), item.task_vectors.clone()

    first = list(stream.map(pointers_and_values))
    second = list(stream.map(pointers_and_values))
    assert {ptr for _, (ptr, _) in second} <= {ptr for _, (ptr, _) in first}
    for (key, (_, a)), (key2, (_, b)) in zip(first, second, strict=True):
        assert key == key2 and torch.equal(a, b)


def test_map_propagates_errors_and_cleans_up():
    stream = TaskVectorStream(pool_of(), progress=False, threads=2)
    torch_threads = torch.get_num_threads()

    def fail_on_c(item):
        if item.key == "c":
            raise MergeBenchError("boom at c")
        return item.key

    with pytest.raises(MergeBenchError, match="boom at c"):
        list(stream.map(fail_on_c))
    assert torch.get_num_threads() == torch_threads
    # Stopping early leaves nothing running either.
    for _ in stream.map(lambda item: item.key):
        break
    assert torch.get_num_threads() == torch_threads


def test_random_transforms_replay_in_key_order_whatever_the_threads(monkeypatch):
    pool = pool_of(num_tasks=3)
    merged = []
    for threads in ("1", "3"):
        monkeypatch.setenv("MERGEBENCH_THREADS", threads)
        result = mergebench.merge_pool("dare", pool, progress=False, drop=0.5, seed=4)
        merged.append(result.state_dict())
    for key in merged[0]:
        assert torch.equal(bits(merged[0][key]), bits(merged[1][key])), key


def test_bad_thread_settings_are_named(monkeypatch):
    monkeypatch.setenv("MERGEBENCH_THREADS", "two")
    with pytest.raises(MergeBenchError, match="MERGEBENCH_THREADS: 'two'"):
        TaskVectorStream(pool_of(), progress=False)


def test_non_finite_weights_name_the_file_and_key(tmp_path):
    pre = {"w": torch.zeros(4)}
    save_file(pre, tmp_path / "pre.safetensors")
    save_file({"w": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, tmp_path / "bad.safetensors")
    save_file({"w": torch.ones(4)}, tmp_path / "good.safetensors")
    finetuned = {"good": tmp_path / "good.safetensors", "bad": tmp_path / "bad.safetensors"}
    with pytest.raises(MergeBenchError, match="bad.safetensors.*'w' has non-finite"):
        mergebench.merge("emr", tmp_path / "pre.safetensors", finetuned, progress=False)


def test_task_vectors_that_overflow_float32_are_reported():
    pre = {"w": torch.tensor([-3e38, 0.0])}
    finetuned = {"a": {"w": torch.tensor([3e38, 0.0])}}
    with pytest.raises(MergeBenchError, match="'w': task vectors overflow float32"):
        mergebench.merge("task_arithmetic", pre, finetuned, progress=False)


# --- task-order sums ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 1000), (20, 5), (20, 1000), (3, 33, 7)])
def test_sum_tasks_adds_rows_in_task_order(shape):
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 3, shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    x = torch.randn(shape, generator=g) * scales
    in_order = x[0].clone()
    for row in x[1:]:
        in_order += row
    assert torch.equal(bits(sum_tasks(x)), bits(in_order))
    assert torch.equal(
        bits(sum_tasks(x.transpose(1, -1).contiguous().transpose(1, -1))), bits(in_order)
    )


# --- CPU kernels against the torch formulas -----------------------------------------------
def coarse_task_vectors(g: torch.Generator, n_tasks: int, n: int) -> torch.Tensor:
    """Few distinct values: exact ties, zero sums, all-zero columns and -0.0 entries."""
    taus = torch.randint(-3, 4, (n_tasks, n), generator=g).float() * 0.5
    taus[:, ::7] = 0.0
    taus[:, ::13] = -0.0
    taus[1 % n_tasks, ::11] = -0.0
    return taus


def test_elect_matches_the_formula_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    scratch = Scratch()
    for _ in range(30):
        n_tasks, n = (
            int(torch.randint(1, 9, (1,), generator=g)),
            int(torch.randint(1, 999, (1,), generator=g)),
        )
        taus = coarse_task_vectors(g, n_tasks, n)
        total = taus.sum(0)
        gamma = torch.where(total > 0, 1.0, -1.0)
        eps = torch.where(taus * gamma > 0, taus.abs(), torch.zeros_like(taus)).amax(0)
        expected = gamma * eps  # -0.0 where no task agrees with gamma = -1
        assert torch.equal(bits(elect(taus)), bits(expected))
        assert torch.equal(bits(elect(taus, total, scratch)), bits(expected))
        fused = modulators._modulate_blocks(taus, None, False, "global", False, "max")
        assert torch.equal(bits(fused.unified), bits(expected))


@pytest.mark.parametrize("block", [8, 64, 1 << 15])
def test_modulator_kernel_matches_the_torch_path(monkeypatch, block):
    monkeypatch.setattr(modulators, "SUM_BLOCK", block)
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        n_tasks, n = (
            int(torch.randint(1, 7, (1,), generator=g)),
            int(torch.randint(1, 700, (1,), generator=g)),
        )
        taus = coarse_task_vectors(g, n_tasks, n) + 0.01 * torch.randn(n_tasks, n, generator=g)
        unified = elect(taus)
        for mask in (True, False):
            for rescaler in ("tensor_mean", "global"):
                fast = modulators._modulate_blocks(taus, unified, mask, rescaler, True)
                fused = modulators._modulate_blocks(taus, None, mask, rescaler, True, "max")
                slow = modulators._modulate_torch(taus, unified, mask, rescaler, None, True)
                assert torch.equal(bits(fused.unified), bits(unified))
                for other in (fused, slow):
                    if mask:
                        assert torch.equal(fast.packed, other.packed)
                    torch.testing.assert_close(fast.numerator, other.numerator, rtol=1e-13, atol=0)
                    torch.testing.assert_close(
                        fast.denominator, other.denominator, rtol=1e-13, atol=0
                    )


@pytest.mark.parametrize("block", [8, 64, 1 << 15])
def test_ties_kernel_matches_the_torch_formula_bit_for_bit(monkeypatch, block):
    monkeypatch.setattr(ties, "_BLOCK", block)
    g = torch.Generator().manual_seed(11)
    for _ in range(10):
        n_tasks, n = (
            int(torch.randint(1, 9, (1,), generator=g)),
            int(torch.randint(1, 700, (1,), generator=g)),
        )
        taus = coarse_task_vectors(g, n_tasks, n) + (
            torch.rand(n_tasks, n, generator=g) < 0.3
        ) * torch.randn(n_tasks, n, generator=g)
        thresholds = torch.rand(n_tasks, generator=g)
        for aggregate in ("sum", "mean"):
            for scaling in (0.3, 1.0, 1 / 3):
                fast = ties._merge_blocks(taus, thresholds, aggregate, scaling)
                slow = scaling * ties.elect_and_disjoint_merge(
                    ties.trim(taus, thresholds), aggregate
                )
                assert torch.equal(bits(fast), bits(slow))


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5)])
def test_numpy_and_torch_bit_packing_agree(shape):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(4, *shape, generator=g) > 0.5
    packed = pack_bits(mask)
    assert torch.equal(packed, _pack_bits_torch(mask.reshape(4, -1)))
    assert torch.equal(unpack_bits(packed, shape), mask)
    assert torch.equal(_unpack_bits_torch(packed, shape), mask)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 20])
def test_torch_bit_kernels_equal_numpy_in_dtype_shape_and_value(numel):
    g = torch.Generator().manual_seed(numel)
    mask = torch.rand(3, numel, generator=g) > 0.5
    packed = pack_bits(mask)
    torch_packed = _pack_bits_torch(mask)
    assert torch_packed.dtype == packed.dtype == torch.uint8
    assert torch_packed.shape == packed.shape == (3, (numel + 7) // 8)
    assert torch.equal(torch_packed, packed)
    for lead in [(), (3,), (1, 3)]:  # one row, rows, rows of rows
        rows = packed.reshape(lead + (packed.shape[-1],)) if lead else packed[1]
        want = mask.reshape(lead + (numel,)) if lead else mask[1]
        got = _unpack_bits_torch(rows, (numel,))
        assert got.dtype == torch.bool and got.shape == want.shape
        assert torch.equal(got, want)
        assert torch.equal(unpack_bits(rows, (numel,)), want)


def test_packed_bits_are_little_endian_powers_of_two():
    mask = torch.tensor([[True, False, False, False, False, False, False, True, True]])
    expected = torch.tensor([[1 + 128, 1]], dtype=torch.uint8)
    assert torch.equal(pack_bits(mask), expected)
    assert torch.equal(_pack_bits_torch(mask), expected)
    assert torch.equal(_unpack_bits_torch(expected[0], (3, 3)), mask.reshape(3, 3))


# --- a GPU, when there is one ---------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("method", "params"),
    [("emr", {}), ("ties", {}), ("task_arithmetic", {}), ("dare", {"drop": 0.5}),
     ("mask_rescale", {"base": "ties"})],
)  # fmt: skip
def test_cuda_merges_match_cpu_merges(method, params):
    pool = pool_of(num_tasks=5, seed=2)
    cpu = mergebench.merge_pool(method, pool, progress=False, **params)
    gpu = mergebench.merge_pool(method, pool, device="cuda", progress=False, **params)
    if cpu.kind == "single":  # the same float32 operations in the same order: bit for bit
        a, b = cpu.state_dict(), gpu.state_dict()
        for key in a:
            assert b[key].device.type == "cpu"
            assert torch.equal(bits(b[key]), bits(a[key])), key
        return
    for key in cpu.unified:
        assert torch.equal(bits(gpu.unified[key]), bits(cpu.unified[key])), key
        assert torch.equal(gpu.masks[key], cpu.masks[key]), key
    for task in pool.tasks:  # float64 sums in another order: equal to rounding
        assert gpu.rescalers[task] == pytest.approx(cpu.rescalers[task], rel=1e-12)
        a, b = cpu.state_dict(task), gpu.state_dict(task)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=0)


def test_radix_select_finds_the_exact_kth_largest_magnitude():
    from mergebench.engine.topk import kth_largest_abs

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = int(torch.randint(1, 5, (1,), generator=g))
        widths = torch.randint(1, 400, (4,), generator=g).tolist()
        # Coarse values: many exact ties; -0.0 entries fold onto +0.0.
        chunks = [torch.randint(-50, 50, (rows, w), generator=g).float() * 0.37 for w in widths]
        chunks[0][:, ::5] = -0.0
        values = torch.cat(chunks, dim=1)
        ks = [int(torch.randint(1, values.shape[1] + 1, (1,), generator=g)) for _ in range(rows)]
        found = kth_largest_abs(lambda chunks=chunks: chunks, rows, ks)
        for r in range(rows):
            expected = values[r].abs().sort(descending=True).values[ks[r] - 1]
            assert found[r] == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    pre, finetuned = {"w": torch.zeros(3)}, {"a": {"w": torch.ones(3)}}
    with pytest.raises(MergeBenchError, match=r"device: 'cuda' requested but .*CUDA"):
        mergebench.merge("emr", pre, finetuned, device="cuda", progress=False)


def test_concurrent_merges_restore_torch_threads():
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    pools = [pool_of(seed=s) for s in range(4)]
    with ThreadPoolExecutor(4) as runner:
        results = list(runner.map(lambda p: mergebench.merge_pool("emr", p, progress=False), pools))
    assert len(results) == 4
    assert torch.get_num_threads() == before
    # Each concurrent result is bit for bit the one the same pool merges to alone.
    for pool, result in zip(pools, results, strict=True):
        alone = mergebench.merge_pool("emr", pool, progress=False)
        assert list(result.unified) == list(alone.unified)
        for key in alone.unified:
            assert torch.equal(bits(result.unified[key]), bits(alone.unified[key])), key
            assert torch.equal(result.masks[key], alone.masks[key]), key
        assert result.rescalers == alone.rescalers
        for task in pool.tasks:
            for key, value in alone.state_dict(task).items():
                assert torch.equal(bits(result.state_dict(task)[key]), bits(value)), key
    # ... and the four pools, merged from different weights, give four different models.
    firsts = [r.unified["a"] for r in results]
    assert all(not torch.equal(firsts[0], other) for other in firsts[1:])


@pytest.mark.parametrize(
    ("method", "params"),
    [("emr", {}), ("emr", {"rescaler": "global", "mask": False}), ("ties", {}),
     ("ties", {"aggregate": "mean", "topk_scope": "tensor"}), ("mask_rescale", {"base": "ties"})],
)  # fmt: skip
def test_the_torch_kernels_of_the_gpu_path_agree_with_the_cpu_kernels(monkeypatch, method, params):
    """The GPU runs the torch formulas; here they run on the CPU against the numpy kernels."""
    pool = pool_of(num_tasks=5, seed=3)
    fast = mergebench.merge_pool(method, pool, progress=False, **params)
    monkeypatch.setenv("MERGEBENCH_TORCH_KERNELS", "1")
    slow = mergebench.merge_pool(method, pool, progress=False, **params)
    if fast.kind == "single":
        for key, value in fast.state_dict().items():
            assert torch.equal(bits(slow.state_dict()[key]), bits(value)), key
        return
    for key in fast.unified:
        assert torch.equal(bits(slow.unified[key]), bits(fast.unified[key])), key
        if fast.masks is not None:
            assert torch.equal(slow.masks[key], fast.masks[key]), key
    for task in pool.tasks:
        assert slow.rescalers[task] == pytest.approx(fast.rescalers[task], rel=1e-12)
