"""Breadcrumbs `scope: tensor` over keys the stream cuts into row blocks: the counting passes'
cuts and the per-block tie ranges give the whole-key kernel's result bit for bit (ties at both
cuts across block boundaries, zeros and -0.0, `g + k > n`, nothing kept, several tasks and
threads), and the merge pass really gets the blocks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergebench
import mergebench.engine.stream as stream_module
import mergebench.methods.breadcrumbs as breadcrumbs
import mergebench.methods.breadcrumbs_blocks as breadcrumbs_blocks
from mergebench.engine.pool import ModelPool
from mergebench.engine.stream import TaskVectorStream
from mergebench.reference.breadcrumbs import breadcrumbs_reference

# With the stream's row-block limit at 64 entries: "emb" comes as 5 blocks of 8 rows, "mlp"
# as 6 blocks of 4 rows (48 entries); "odd" cannot be cut into multiples of 8 entries, and
# the small keys stay whole.
SHAPES = {"emb": (40, 8), "mlp": (24, 12), "odd": (9, 5, 3), "norm": (8,), "scalar": ()}
SPLIT = {"emb", "mlp"}
LIMIT = 64

PARAMS = [
    {"density": 0.3, "outlier": 0.1, "scaling": 0.7},
    {"density": 0.5, "outlier": 0.25, "scaling": -0.7},  # cuts inside big groups of ties
    {"density": 0.9, "outlier": 0.3, "scaling": 1.0},  # g + k > n: kept to the end
    {"density": 0.001, "outlier": 0.0, "scaling": -1.0},  # k = 0: nothing kept (-0.0 out)
    {"density": 0.02, "outlier": 0.0, "scaling": 1.0},  # the top few only
]


def tied_pool(tmp_path, dtype):
    """Quarter steps from quarter values (exact in float32 and bf16): |tau| takes 4 values
    besides 0, so both cuts fall inside runs of equal entries that span the row blocks;
    +0.0 -> -0.0 entries give tau = -0.0."""
    g = torch.Generator().manual_seed(17)
    pre = {k: (torch.randint(-8, 9, s, generator=g).float() * 0.25) for k, s in SHAPES.items()}
    pre["emb"][3, :4] = 0.0
    paths = {}
    for task in range(3):
        state = {}
        for key, value in pre.items():
            step = torch.randint(-4, 5, value.shape, generator=g).float() * 0.25
            state[key] = (value + step).to(dtype)
        state["emb"][3, :4] = -0.0
        paths[f"t{task}"] = str(tmp_path / f"t{task}.safetensors")
        save_file(state, paths[f"t{task}"])
    save_file({k: v.to(dtype) for k, v in pre.items()}, tmp_path / "pre.safetensors")
    return str(tmp_path / "pre.safetensors"), paths


def bits(tensor):
    return tensor.view(torch.int16 if tensor.dtype == torch.bfloat16 else torch.int32)


# The blocks' ties from their kept pass-2 histograms (default), or from pass 3 (none kept).
HELD = [None, 0]


@pytest.mark.parametrize("held", HELD)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_blocked_tensor_scope_is_the_whole_key_bit_for_bit(tmp_path, monkeypatch, dtype,
                                                                held):  # fmt: skip
    pre, finetuned = tied_pool(tmp_path, dtype)
    if held is not None:
        monkeypatch.setattr(breadcrumbs_blocks, "HELD_HISTOGRAM_BYTES", held)
    found = []
    counted = breadcrumbs.tensor_cuts

    def spy(*args, **kwargs):
        found.append(counted(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(breadcrumbs, "tensor_cuts", spy)
    for params in PARAMS:
        params = {**params, "scope": "tensor"}
        whole = mergebench.merge("breadcrumbs", pre, finetuned, progress=False, **params)
        assert found.pop() == {}  # nothing big enough to cut at the stream's own limit
        reference = breadcrumbs_reference(
            load_file(pre), {t: load_file(path) for t, path in finetuned.items()}, **params
        )
        with monkeypatch.context() as patch:
            patch.setattr(stream_module, "ROW_BLOCK_NUMEL", LIMIT)
            for threads in ("1", "2"):
                patch.setenv("MERGEBENCH_THREADS", threads)
                cut = mergebench.merge("breadcrumbs", pre, finetuned, progress=False, **params)
                assert set(found.pop()) == SPLIT
                for key, value in whole.state_dict().items():
                    got = cut.state_dict()[key]
                    assert got.dtype == dtype, key
                    assert torch.equal(bits(got), bits(value)), (key, params, threads)
                    assert torch.equal(bits(got), bits(reference[key])), (key, params)


@pytest.mark.parametrize("held", HELD)
def test_ties_spanning_blocks_are_counted_before_each_block(tmp_path, monkeypatch, held):
    """Where the stable sort keeps only some entries equal to a cut, the blocks after the
    first start from the ties before them (read from the blocks' pass-2 histograms, or
    counted in pass 3): those of the whole key before the block, in flat order."""
    pre, finetuned = tied_pool(tmp_path, torch.float32)
    passes = []
    if held is not None:
        monkeypatch.setattr(breadcrumbs_blocks, "HELD_HISTOGRAM_BYTES", held)
    count_ties = breadcrumbs_blocks.breadcrumbs_kernels.tie_counts

    def spy(*args):
        passes.append("ties")
        return count_ties(*args)

    monkeypatch.setattr(breadcrumbs_blocks.breadcrumbs_kernels, "tie_counts", spy)
    monkeypatch.setattr(stream_module, "ROW_BLOCK_NUMEL", LIMIT)
    stream = TaskVectorStream(ModelPool.from_checkpoints(pre, finetuned), progress=False)
    cuts = breadcrumbs.tensor_cuts(stream, lambda n: breadcrumbs.row_keep_range(n, 0.5, 0.25),
                                   "breadcrumbs")  # fmt: skip
    assert set(cuts) == SPLIT
    for key in SPLIT:
        cut = cuts[key]
        assert sorted(cut.ties_before) == [r for r, _ in stream.split_keys()[key][1:]], key
        whole = torch.stack([stream.pool.finetuned[t].get(key) for t in stream.tasks])
        taus = (whole - stream.pool.pretrained.get(key)).abs().reshape(3, -1)
        values = torch.from_numpy(cut.cut_bits.view("float32"))
        for first_row, before in cut.ties_before.items():
            prefix = taus[:, : first_row * taus.shape[1] // SHAPES[key][0]]
            for c in range(2):
                expected = (prefix == values[c][:, None]).sum(dim=1)
                assert torch.equal(torch.from_numpy(before[c]), expected), (key, first_row)
    assert bool(passes) == (held == 0)  # pass 3 only for keys whose histograms are not kept


def test_the_merge_pass_gets_row_blocks(tmp_path, monkeypatch):
    pre, finetuned = tied_pool(tmp_path, torch.bfloat16)
    units, sizes = [], {}
    load, merge_item = TaskVectorStream._load, breadcrumbs.Breadcrumbs.merge_item

    def spy_load(self, unit, buffers):
        units.append((unit.key, unit.rows))
        return load(self, unit, buffers)

    def spy_merge(self, item):
        sizes[item.key] = max(sizes.get(item.key, 0), item.task_vectors[0].numel())
        return merge_item(self, item)

    monkeypatch.setattr(stream_module, "ROW_BLOCK_NUMEL", LIMIT)
    monkeypatch.setattr(TaskVectorStream, "_load", spy_load)
    monkeypatch.setattr(breadcrumbs.Breadcrumbs, "merge_item", spy_merge)
    params = {"density": 0.5, "outlier": 0.25, "scope": "tensor"}
    mergebench.merge("breadcrumbs", pre, finetuned, progress=False, **params)
    assert ("emb", None) not in units and ("mlp", None) not in units
    assert ("emb", (8, 16)) in units and ("odd", None) in units
    assert {key: sizes[key] for key in ("emb", "mlp", "odd")} == {"emb": 64, "mlp": 48, "odd": 135}
    # The torch path (the GPU's) keeps whole keys, and the same result.
    units.clear()
    monkeypatch.setenv("MERGEBENCH_TORCH_KERNELS", "1")
    mergebench.merge("breadcrumbs", pre, finetuned, progress=False, **params)
    assert ("emb", None) in units and ("emb", (8, 16)) not in units
