"""Task arithmetic straight from bf16 bytes (`kernels.task_arithmetic_bf16`, the artifact path
of `TaskArithmetic`): bit for bit the torch formula and the float32 stream, on bf16 values
with subnormals, -0.0, inf and nan, odd shapes and several spans per key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mergebench
import mergebench.engine.spans as spans_module
from mergebench.engine import kernels
from mergebench.engine.safetensors_reader import SafetensorsReader
from mergebench.methods import task_arithmetic
from mergebench.results.shards import Entry, ShardedWriter
from mergebench.util.errors import MergeBenchError

SIZES = [1, 7, 2047, 2048, 2049, 5000, 70_001]


def bits(tensor: torch.Tensor) -> np.ndarray:
    """The bf16 bits of `tensor` as uint16."""
    return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)


def hard_bf16(rng: np.random.Generator, shape: tuple[int, ...], huge: bool = True) -> torch.Tensor:
    """bf16 weights over many binades, with subnormals, exact zeros of both signs and (if
    `huge`) values near the largest bf16, whose task vectors and sums may overflow."""
    values = rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20, shape))
    out = torch.from_numpy(values.astype(np.float32)).bfloat16()
    flat = out.view(-1)
    flat[::5] = torch.from_numpy(rng.integers(1, 0x80, flat[::5].shape).astype(np.int16)).view(
        torch.bfloat16
    )  # subnormals (the smallest bf16 entries)
    flat[::7] = 0.0
    flat[::11] = -0.0
    if huge:
        flat[::17] = 3.0e38
    return out


def torch_formula(weights: torch.Tensor, scaling: float) -> tuple[torch.Tensor, bool]:
    """What the float32 stream computes: `pre + scaling * (((0 + tau_0) + tau_1) + ...)`,
    rounded to bf16 by torch; and whether the task sum is finite."""
    pre = weights[0].float()
    total = torch.zeros_like(pre)
    for expert in weights[1:]:
        total = total + (expert.float() - pre)
    return (pre + scaling * total).bfloat16(), bool(torch.isfinite(total).all())


@pytest.mark.parametrize("n_tasks", [1, 2, 3, 5])
@pytest.mark.parametrize("size", SIZES)
def test_kernel_is_the_torch_formula_bit_for_bit(n_tasks, size):
    rng = np.random.default_rng(size * 10 + n_tasks)
    weights = hard_bf16(rng, (n_tasks + 1, size))
    if size > 1:  # expert entries equal to the base (exact zero task vectors), both signs
        weights[1:, 1::3] = weights[0, 1::3]
        weights[1, 2::9] = -0.0
    for scaling in (0.3, 1.0, -1.7, 1e30):  # 1e30: merged entries overflow to +-inf
        want, finite = torch_formula(weights, scaling)
        out = np.empty(size, dtype=np.uint16)
        stored = bits(weights)
        got = kernels.task_arithmetic_bf16(stored[0], stored[1:], np.float32(scaling), out)
        assert got == finite
        np.testing.assert_array_equal(out, bits(want))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("row", [0, 2])
def test_kernel_reports_a_non_finite_task_sum(bad, row):
    weights = hard_bf16(np.random.default_rng(1), (3, 4099))
    weights[row, 4000] = bad
    stored, out = bits(weights), np.empty(4099, dtype=np.uint16)
    assert not kernels.task_arithmetic_bf16(stored[0], stored[1:], np.float32(0.3), out)
    # Overflow of the task sum itself (no non-finite weight) counts too.
    big = torch.full((3, 10), 3.0e38, dtype=torch.bfloat16)
    big[0] = -3.0e38
    stored, out = bits(big), np.empty(10, dtype=np.uint16)
    assert not kernels.task_arithmetic_bf16(stored[0], stored[1:], np.float32(0.3), out)


def test_bf16_round_is_torchs_cast():
    """Every bf16 high half with the low halves that decide the rounding (ties to even
    both ways, just below and above a tie), infinities, subnormals, and the carry into the
    exponent (the largest finite values round to inf)."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    patterns = (high[:, None] | low[None, :]).reshape(-1)
    values = patterns.view(np.float32)
    out = np.empty(values.size, dtype=np.uint16)
    kernels.bf16_round(values, out)
    want = bits(torch.from_numpy(values).bfloat16())
    nan = np.isnan(values)
    np.testing.assert_array_equal(out[~nan], want[~nan])
    # nan: 0xFFFF, the bits of torch's vectorized cast (its scalar cast gives 0x7FC0;
    # either is a nan, and task arithmetic never writes one: its inputs are finite).
    assert (out[nan] == 0xFFFF).all()
    assert torch.isnan(torch.from_numpy(want[nan].view(np.int16)).view(torch.bfloat16)).all()


# --- the artifact path against the float32 stream -----------------------------------------
SHAPES = {"embed": (37, 24), "proj": (24, 33), "norm": (24,), "scalar": (), "long": (3001,)}


def write_pool(folder: Path, n_tasks: int = 3, bad: str | None = None) -> tuple[Path, dict]:
    rng = np.random.default_rng(7)
    weights = {k: hard_bf16(rng, (n_tasks + 1, *shape), huge=False) for k, shape in SHAPES.items()}
    if bad is not None:
        weights[bad][2].view(-1)[5] = float("nan")
    paths = {}
    for index, name in enumerate(("base", *(f"t{i}" for i in range(n_tasks)))):
        path = folder / f"{name}.safetensors"
        save_file({k: w[index].contiguous() for k, w in weights.items()}, str(path))
        paths[name] = path
    base = paths.pop("base")
    return base, paths


@pytest.mark.parametrize("span", [spans_module.SPAN_NUMEL, 1000, 7])
def test_artifact_is_the_float32_streams_bit_for_bit(tmp_path, monkeypatch, span):
    """Spans of 1000 and 7 entries cut keys mid-row and leave odd remainders."""
    monkeypatch.setattr(spans_module, "SPAN_NUMEL", span)
    base, experts = write_pool(tmp_path)
    fused = mergebench.merge("task_arithmetic", base, experts, scaling=0.3, progress=False,
                             output_dir=tmp_path / "fused")  # fmt: skip
    in_memory = mergebench.merge("task_arithmetic", base, experts, scaling=0.3, progress=False)
    monkeypatch.setattr(spans_module, "ENABLED", False)
    mergebench.merge("task_arithmetic", base, experts, scaling=0.3, progress=False,
                     output_dir=tmp_path / "streamed")  # fmt: skip
    fused_state, memory_state = fused.state_dict(), in_memory.state_dict()
    assert set(fused_state) == set(SHAPES)
    for key in SHAPES:
        assert fused_state[key].dtype == torch.bfloat16
        assert torch.equal(bits_tensor(fused_state[key]), bits_tensor(memory_state[key])), key
    files = sorted(p.name for p in (tmp_path / "fused").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "fused" / name).read_bytes() == (
            tmp_path / "streamed" / name
        ).read_bytes()


def bits_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int16)


def test_artifact_path_names_the_non_finite_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(spans_module, "SPAN_NUMEL", 16)
    base, experts = write_pool(tmp_path, bad="proj")
    with pytest.raises(
        MergeBenchError, match=r"^finetuned\[t1\] .*t1.safetensors\): tensor .proj. has non-finite"
    ):
        mergebench.merge("task_arithmetic", base, experts, scaling=0.3, progress=False,
                         output_dir=tmp_path / "out")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_other_output_dtypes_take_the_stream(tmp_path, monkeypatch):
    base, experts = write_pool(tmp_path)
    calls = []
    original = task_arithmetic.TaskArithmetic._write_bf16
    monkeypatch.setattr(task_arithmetic.TaskArithmetic, "_write_bf16",
                        lambda *a: calls.append(1) or original(*a))  # fmt: skip
    result = mergebench.merge("task_arithmetic", base, experts, scaling=0.3, progress=False,
                              out_dtype="float32", output_dir=tmp_path / "f32")  # fmt: skip
    assert calls == []
    want = mergebench.merge("task_arithmetic", base, experts, scaling=0.3, progress=False,
                            out_dtype="float32")  # fmt: skip
    for key in SHAPES:
        assert result.state_dict()[key].dtype == torch.float32
        assert torch.equal(result.state_dict()[key], want.state_dict()[key])
    mergebench.merge("task_arithmetic", base, experts, scaling=0.3, progress=False,
                     output_dir=tmp_path / "bf16")  # fmt: skip
    assert calls == [1]


def test_read_stored_reads_a_span_and_refuses_bad_buffers(tmp_path):
    base, _ = write_pool(tmp_path)
    reader = SafetensorsReader([base], "base")
    want = bits(reader.get("long"))
    span = np.empty(100, dtype=np.uint16)
    reader.read_stored("long", span, 2901)
    np.testing.assert_array_equal(span, want[2901:])
    assert reader.stored_dtype("long") == torch.bfloat16
    with pytest.raises(MergeBenchError, match=r"^base: tensor 'long': entries 2902:3002 are"):
        reader.read_stored("long", span, 2902)
    with pytest.raises(MergeBenchError, match=r"^base: tensor 'long': a float32 \[100\] buffer"):
        reader.read_stored("long", np.empty(100, dtype=np.float32), 0)


def test_writer_refuses_a_span_outside_its_key(tmp_path):
    entries = [Entry("w", (3, 5), torch.bfloat16)]
    with ShardedWriter(tmp_path, "model", entries) as writer:
        writer.write_span("w", torch.ones(10, dtype=torch.bfloat16), 0)
        with pytest.raises(MergeBenchError, match=r"^model: 'w' entries torch.bfloat16 10:16 "):
            writer.write_span("w", torch.ones(6, dtype=torch.bfloat16), 10)
        with pytest.raises(MergeBenchError, match=r"^model: 'w' entries torch.float32 10:15 "):
            writer.write_span("w", torch.ones(5), 10)
        writer.write_span("w", torch.full((5,), 2.0, dtype=torch.bfloat16), 10)
    written = SafetensorsReader([tmp_path / "model.safetensors"], "out").get("w")
    assert torch.equal(written.view(-1), torch.tensor([1.0] * 10 + [2.0] * 5).bfloat16())
