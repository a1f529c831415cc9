"""Float32 files into an artifact span by span (`engine.spans`: EMR, task arithmetic, DARE on
task arithmetic, TIES with a global threshold, "X w/ M&R") give the stream's artifact byte for byte: keys cut into several spans,
spans that end inside a byte of masks, row-block units (EMR's rescaler sums), empty and
one-entry keys, exact ties, zero task vectors and -0.0; a nan/inf stops the merge as the
stream does."""

from __future__ import annotations

import filecmp
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mergebench
import mergebench.engine.spans as spans_module
import mergebench.engine.stream as stream_module
from mergebench.engine import kernels
from mergebench.util.errors import MergeBenchError

# A span is 8,192 entries here (one float64-sum chunk): "big" has 4 spans, the last 1,811
# entries (not whole bytes of masks); "rows" is 2-D (row blocks when the stream cuts it).
SHAPES = {
    "big": (26_387,),
    "rows": (77, 260),
    "chunk": (8192,),
    "odd": (8193,),
    "one": (1,),
    "seven": (7,),
    "empty": (0,),
}
CASES = [
    ("emr", {}),
    ("emr", {"rescaler": "global"}),
    ("emr", {"magnitude": "sum"}),
    ("emr", {"mask": False}),
    ("emr", {"rescale": False}),
    ("emr", {"mask": False, "rescale": False}),
    ("task_arithmetic", {"scaling": 0.3}),
    ("task_arithmetic", {"scaling": -1.7}),
    ("dare", {"drop": 0.5}),
    ("dare", {"drop": 0.9, "rescale": False, "seed": 7}),
    ("ties", {"k": 0.3}),
    ("ties", {"k": 0.05, "aggregate": "mean", "scaling": 0.7}),
    ("mask_rescale", {"base": "task_arithmetic"}),
    ("mask_rescale", {"base": "ties", "rescaler": "global"}),
    ("mask_rescale", {"base": "weight_averaging", "mask": False}),  # its base: the stream
]


def pool(folder: Path, tasks: int = 3, bad: float | None = None) -> tuple[Path, dict[str, Path]]:
    g = torch.Generator().manual_seed(11)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    pre["big"][::13] = -0.0
    save_file(pre, folder / "pre.safetensors")
    experts = {}
    for t in range(tasks):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        state["big"][5::9] = pre["big"][5::9]  # task vectors of exact zeros
        state["big"][::13] = 0.0  # +0.0 - (-0.0): zero task vectors of either sign
        state["rows"][3] = pre["rows"][3] + 0.25  # the same |tau| everywhere: ties
        state["chunk"][100:200] = pre["chunk"][100:200] + (0.5 if t % 2 else -0.5)
        if bad is not None and t == 1:
            state["big"][20_000] = bad
        save_file(state, folder / f"t{t}.safetensors")
        experts[f"t{t}"] = folder / f"t{t}.safetensors"
    return folder / "pre.safetensors", experts


def same_files(left: Path, right: Path) -> None:
    names = sorted(p.name for p in left.iterdir())
    assert names == sorted(p.name for p in right.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(left, right, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


@pytest.fixture
def small_spans(monkeypatch):
    monkeypatch.setattr(spans_module, "SPAN_NUMEL", kernels.CAST_CHUNK)
    calls = []
    for name in ("emr_span", "task_arithmetic_span", "ties_merge"):
        kernel = getattr(kernels, name)

        def spy(*args, _kernel=kernel, _name=name):
            calls.append(_name)
            return _kernel(*args)

        monkeypatch.setattr(kernels, name, spy)
    read = spans_module.SpanBuffers.read

    def reading(self, sources, piece):
        calls.append("read")
        return read(self, sources, piece)

    monkeypatch.setattr(spans_module.SpanBuffers, "read", reading)
    return calls


def kernel_calls(calls: list[str]) -> list[str]:
    return [name for name in calls if name != "read"]


@pytest.mark.parametrize("row_blocks", [False, True], ids=["whole_keys", "row_blocks"])
@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_spans_write_the_streams_artifact(tmp_path, monkeypatch, small_spans, method, params,
                                          row_blocks):  # fmt: skip
    pre, experts = pool(tmp_path)
    if row_blocks:  # "rows" (20,020 entries) in blocks of 40 rows: EMR's units
        monkeypatch.setattr(stream_module, "REUSE_MAX_NUMEL", 10_400)
    mergebench.merge(method, pre, experts, progress=False, output_dir=tmp_path / "spans",
                     **params)  # fmt: skip
    # 4 spans of "big", 3 of "rows" (EMR with row blocks: 2 + 2, each block cut from its own
    # start), 1 of "chunk", 2 of "odd", 1 each of "one" and "seven" ("empty": no kernel).
    # "X w/ M&R": whole keys, after its base's own spans (task arithmetic, TIES: 12 more).
    expected = 13 if row_blocks and method == "emr" else 12
    if method == "mask_rescale" and params["base"] != "weight_averaging":
        expected += 12
    assert len(kernel_calls(small_spans)) == expected
    if method == "ties":  # its counting passes read span by span too
        assert set(kernel_calls(small_spans)) == {"ties_merge"}
        # a sample of 1 span in 16, the window pass, the merge pass; the radix select's
        # two passes instead of the window's (a sample too unsure) or after it (a miss)
        assert small_spans.count("read") in (1 + 2 * 13, 1 + 3 * 13, 1 + 4 * 13)
    monkeypatch.setattr(spans_module, "ENABLED", False)

    def no_spans(*args):
        raise AssertionError("the stream's merge read a span")

    monkeypatch.setattr(spans_module.SpanBuffers, "read", no_spans)
    mergebench.merge(method, pre, experts, progress=False, output_dir=tmp_path / "stream",
                     **params)  # fmt: skip
    same_files(tmp_path / "spans", tmp_path / "stream")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("method", ["emr", "task_arithmetic", "dare", "ties"])
def test_a_non_finite_weight_stops_the_merge_and_names_the_file(tmp_path, small_spans, bad,
                                                                method):  # fmt: skip
    pre, experts = pool(tmp_path, bad=bad)
    with pytest.raises(MergeBenchError, match=r"t1\.safetensors.*'big'.*non-finite"):
        mergebench.merge(method, pre, experts, progress=False, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert "read" in small_spans  # it was the span path that found it


def test_overflowing_task_vectors_are_reported(tmp_path, small_spans):
    pre, experts = pool(tmp_path)
    state = {k: torch.zeros(s) for k, s in SHAPES.items()}
    state["odd"][8192] = 3.0e38
    for t in experts:
        save_file(state, experts[t])
    save_file({k: -v if k == "odd" else v for k, v in state.items()}, pre)
    with pytest.raises(MergeBenchError, match="'odd'.*overflow"):
        mergebench.merge("emr", pre, experts, progress=False, output_dir=tmp_path / "out")


@pytest.mark.parametrize(
    ("method", "params"),
    [("ties", {"topk_scope": "tensor", "k": 0.5}), ("dare", {"base": "ties"})],
)
def test_what_spans_do_not_cover_takes_the_stream(tmp_path, small_spans, method, params):
    """TIES' per-tensor threshold needs the whole key; DARE on TIES transforms before the
    counting passes: both go the stream's way, as before."""
    pre, experts = pool(tmp_path)
    mergebench.merge(method, pre, experts, progress=False, output_dir=tmp_path / "out", **params)
    assert "read" not in small_spans


@pytest.mark.parametrize("method", ["emr", "task_arithmetic", "ties"])
def test_other_dtypes_take_the_stream(tmp_path, small_spans, method):
    """A float16 pool (or any pool not stored as float32 throughout) goes the stream's way."""
    pre, experts = pool(tmp_path)
    for path in [pre, *experts.values()]:
        save_file({k: v.half() for k, v in load_file(path).items()}, path)
    mergebench.merge(method, pre, experts, progress=False, output_dir=tmp_path / "out")
    assert "read" not in small_spans


@pytest.mark.parametrize(("spread", "width"), [(0, 8_192), (2_048, 8_192), (3_001, 12_004),
                                               (32_768, 131_072), (32_769, None)])  # fmt: skip
def test_ties_window_is_as_wide_as_the_sample_quarters_disagree(tmp_path, monkeypatch,
                                                               small_spans, spread, width):  # fmt: skip
    """The sampled window's half width: twice the largest distance of a quarter's estimate
    from the whole sample's, at least `_MIN_HALF` (4,096) values; past `_MAX_HALF` (65,536)
    no window pass at all (the radix select's two passes)."""
    from mergebench.methods import ties

    pre, experts = pool(tmp_path)
    monkeypatch.setattr(ties, "_SAMPLE_EVERY", 1)  # 13 spans: quarters of 4, 3, 3, 3
    real_estimate, real_count = ties._value_of_rank, kernels.window_counts
    estimates, wholes, widths = [], [], []

    def estimate(counts, rank):  # per task: the whole sample's estimate, then its 4 quarters'
        estimates.append(real_estimate(counts, rank))
        position = (len(estimates) - 1) % 5
        if position == 0:
            wholes.append(estimates[-1])
            return wholes[-1]
        return wholes[-1] + (spread if position == 1 else 0)  # one quarter off by `spread`

    def count(raw, lows, window, above, sums):
        widths.append(window.shape[1])
        return real_count(raw, lows, window, above, sums)

    monkeypatch.setattr(ties, "_value_of_rank", estimate)
    monkeypatch.setattr(kernels, "window_counts", count)
    mergebench.merge("ties", pre, experts, k=0.3, progress=False, output_dir=tmp_path / "spans")
    assert len(estimates) == 3 * 5
    if width is None:  # too unsure: the sample, pass 1, pass 2, the merge
        assert not widths and small_spans.count("read") == 4 * 13
    else:
        assert set(widths) == {width}
        # the sample, the window pass, the merge (a hit) or pass 1 and pass 2 too (a miss)
        assert small_spans.count("read") in (3 * 13, 5 * 13)
    monkeypatch.setattr(spans_module, "ENABLED", False)
    mergebench.merge("ties", pre, experts, k=0.3, progress=False, output_dir=tmp_path / "stream")
    same_files(tmp_path / "spans", tmp_path / "stream")


def test_ties_with_an_empty_sample_counts_in_two_passes(tmp_path, monkeypatch, small_spans):
    """A sample of empty keys only (here the first span, of key "a", is the whole sample)
    has nothing to guess from: pass 1 and pass 2 as without a guess, the stream's artifact."""
    from mergebench.methods import ties

    g = torch.Generator().manual_seed(5)
    pre = {"a": torch.zeros(0), "w": torch.randn(20_000, generator=g)}
    save_file(pre, tmp_path / "pre.safetensors")
    experts = {}
    for t in range(3):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        save_file(state, tmp_path / f"t{t}.safetensors")
        experts[f"t{t}"] = tmp_path / f"t{t}.safetensors"
    monkeypatch.setattr(ties, "_SAMPLE_EVERY", 1000)  # the first span only
    args = (tmp_path / "pre.safetensors", experts)
    mergebench.merge("ties", *args, k=0.3, progress=False, output_dir=tmp_path / "spans")
    spans = 1 + 3  # "a" (one empty span) and "w" (3 spans of 8,192)
    assert small_spans.count("read") == 1 + 3 * spans  # the sample, pass 1, pass 2, merge
    monkeypatch.setattr(spans_module, "ENABLED", False)
    mergebench.merge("ties", *args, k=0.3, progress=False, output_dir=tmp_path / "stream")
    same_files(tmp_path / "spans", tmp_path / "stream")


@pytest.mark.parametrize("guess", ["hit", "miss"])
@pytest.mark.parametrize("k", [0.3, 0.01, 1.0])
def test_ties_sampled_pass_gives_the_exact_thresholds(tmp_path, monkeypatch, small_spans, guess,
                                                      k):  # fmt: skip
    """TIES' sampled select (an estimate of each task's k-th largest |tau| from a sample, a
    window of values around it counted in one full pass): a hit reads the thresholds off
    the window, a miss runs the radix select's two passes; both give the stream's artifact."""
    from mergebench.methods import ties

    pre, experts = pool(tmp_path)
    if guess == "hit":  # the whole pool as the sample, a window wider than the bin: a hit
        monkeypatch.setattr(ties, "_SAMPLE_EVERY", 1)
        monkeypatch.setattr(ties, "_MIN_HALF", 1 << 17)
        monkeypatch.setattr(ties, "_MAX_HALF", 1 << 30)
    else:  # an estimate far from any task vector's value
        monkeypatch.setattr(ties, "_value_of_rank", lambda counts, rank: 30_000 << 16)
    mergebench.merge("ties", pre, experts, k=k, progress=False, output_dir=tmp_path / "spans")
    # hit: the sample (all 13 spans), the window pass, the merge; miss: 1 sampled span, the
    # window pass, pass 1, pass 2, the merge
    assert small_spans.count("read") == (3 * 13 if guess == "hit" else 1 + 4 * 13)
    monkeypatch.setattr(spans_module, "ENABLED", False)
    mergebench.merge("ties", pre, experts, k=k, progress=False, output_dir=tmp_path / "stream")
    same_files(tmp_path / "spans", tmp_path / "stream")


class _Stream:  # what `run_spans` reads of a stream
    def __init__(self, threads: int) -> None:
        self.threads, self.progress = threads, False


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_run_spans_takes_every_span_once_each_thread_with_its_own_buffers(threads):
    pieces = spans_module.spans_of([("a", 0, 5 * spans_module.SPAN_NUMEL + 3), ("b", 0, 0)])
    seen, owners, lock = [], {}, threading.Lock()

    def work(piece, buffers) -> None:
        with lock:
            seen.append(piece)
            assert owners.setdefault(id(buffers), threading.get_ident()) == threading.get_ident()

    spans_module.run_spans(_Stream(threads), pieces, work, "test", 2, np.dtype(np.float32))
    assert sorted(seen, key=lambda p: (p.key, p.first)) == pieces  # once each, none lost
    assert 1 <= len(owners) <= min(threads, len(pieces))


def test_run_spans_stops_at_the_first_error_and_raises_it():
    pieces = spans_module.spans_of([("a", 0, 40 * spans_module.SPAN_NUMEL)])
    taken = []

    def work(piece, buffers) -> None:
        taken.append(piece)
        if piece.first == 3 * spans_module.SPAN_NUMEL:
            raise MergeBenchError("span 3 failed")
        time.sleep(0.05)  # (the failing span's error is in before this span ends)

    with pytest.raises(MergeBenchError, match="span 3 failed"):
        spans_module.run_spans(_Stream(2), pieces, work, "test", 2, np.dtype(np.float32))
    assert 4 <= len(taken) <= 5  # the other thread finishes the span it holds, takes no more


def test_run_spans_raises_a_workers_own_setup_error(monkeypatch):
    def no_memory(*args) -> None:
        raise MemoryError("no buffers")

    monkeypatch.setattr(spans_module, "SpanBuffers", no_memory)
    pieces = spans_module.spans_of([("a", 0, 5 * spans_module.SPAN_NUMEL)])
    done = []
    with pytest.raises(MemoryError, match="no buffers"):  # not a pass that did nothing
        spans_module.run_spans(_Stream(2), pieces, lambda p, b: done.append(p), "test", 2,
                               np.dtype(np.float32))  # fmt: skip
    assert not done
