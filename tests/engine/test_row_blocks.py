"""Keys above the stream's buffer size come in blocks of rows to methods that go entry by
entry (task arithmetic, weight averaging, TIES with a global threshold, EMR, DARE on those):
the results equal the whole-key merge bit for bit (EMR's rescalers to float64 rounding), in memory and
streamed into an artifact, and the blocks are what is read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import mergebench
import mergebench.engine.spans as spans_module
import mergebench.engine.stream as stream_module
from mergebench.engine.checkpoints import StateDictReader
from mergebench.engine.stream import TaskVectorStream, row_blocks_of
from mergebench.engine.views import RowsView
from mergebench.results.shards import Entry, ShardedWriter, open_stem
from mergebench.util.errors import MergeBenchError

# (37, 24): 888 entries, blocks of 2 rows (48 entries); (50, 3): blocks of 16 rows (48
# entries, 21 rows would be 63, not whole bytes of mask); a long 1-D key stays whole.
SHAPES = {"emb": (37, 24), "narrow": (50, 3), "flat": (200,), "small": (4, 4)}
LIMIT = 64


@pytest.fixture(autouse=True)
def _through_the_stream(monkeypatch):
    """These tests watch the stream's units: float32 files into an artifact would go span
    by span instead (tests/engine/test_spans.py holds those to the stream's results)."""
    monkeypatch.setattr(spans_module, "ENABLED", False)


@pytest.mark.parametrize(
    ("shape", "limit", "expected"),
    [
        ((37, 24), 64, [(i, min(37, i + 2)) for i in range(0, 37, 2)]),
        ((50, 3), 64, [(0, 16), (16, 32), (32, 48), (48, 50)]),
        ((8, 8), 64, None),  # fits
        ((200,), 64, None),  # one dimension: no rows to cut
        ((3, 100), 64, None),  # a row above the limit
        ((9, 7), 60, [(0, 8), (8, 9)]),  # 8 rows of 7 = 56 entries, whole bytes
        ((20, 5), 30, None),  # 5-entry rows: 8 rows are needed for whole bytes, 6 allowed
    ],
)
def test_row_blocks_are_whole_rows_of_whole_mask_bytes(shape, limit, expected):
    assert row_blocks_of(shape, limit) == expected


def pool_files(tmp_path, num_tasks: int = 3) -> tuple[str, dict[str, str]]:
    g = torch.Generator().manual_seed(0)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    save_file(pre, tmp_path / "pre.safetensors")
    finetuned = {}
    for t in range(num_tasks):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        state["emb"][3] = pre["emb"][3]  # a row no task moves: masks of zeros there
        save_file(state, tmp_path / f"t{t}.safetensors")
        finetuned[f"t{t}"] = str(tmp_path / f"t{t}.safetensors")
    return str(tmp_path / "pre.safetensors"), finetuned


def run(method, params, pre, finetuned, output_dir=None):
    result = mergebench.merge(
        method, pre, finetuned, progress=False, output_dir=output_dir, **params
    )
    return {task: result.state_dict(task) for task in result.tasks}, result


CASES = [
    ("task_arithmetic", {"scaling": 0.4}),
    ("weight_averaging", {}),
    ("ties", {"k": 0.3, "topk_scope": "global"}),
    ("emr", {}),
    ("emr", {"rescaler": "global"}),
    ("emr", {"magnitude": "sum"}),
    # DARE's draws are per (key, entry): its base's row blocks come through it.
    ("dare", {"drop": 0.5}),
    ("dare", {"drop": 0.5, "base": "ties", "base_params": {"topk_scope": "global"}}),
]


def record_units(monkeypatch) -> list[tuple[str, tuple[int, int] | None]]:
    """The (key, rows) of every unit the stream loads from now on, in load order."""
    units = []
    load = TaskVectorStream._load

    def spy(self, unit, buffers):
        units.append((unit.key, unit.rows))
        return load(self, unit, buffers)

    monkeypatch.setattr(TaskVectorStream, "_load", spy)
    return units


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
@pytest.mark.parametrize(("method", "params"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_row_blocks_give_the_whole_key_result(tmp_path, monkeypatch, method, params, streamed):
    pre, finetuned = pool_files(tmp_path)
    whole, whole_result = run(method, params, pre, finetuned,
                              tmp_path / "whole" if streamed else None)  # fmt: skip

    monkeypatch.setattr(stream_module, "REUSE_MAX_NUMEL", LIMIT)
    units = record_units(monkeypatch)
    blocked, blocked_result = run(method, params, pre, finetuned,
                                  tmp_path / "blocks" if streamed else None)  # fmt: skip

    assert ("emb", (0, 2)) in units and ("narrow", (48, 50)) in units
    assert ("flat", None) in units and ("emb", None) not in units
    if method == "emr":
        for task in whole_result.tasks:  # float64 sums added per block: rounding only
            assert blocked_result.rescalers[task] == pytest.approx(
                whole_result.rescalers[task], rel=1e-12
            )
        for key in SHAPES:
            assert torch.equal(blocked_result.unified[key], whole_result.unified[key]), key
            assert torch.equal(blocked_result.masks[key], whole_result.masks[key]), key
        return
    for task in whole:
        for key, value in whole[task].items():
            assert torch.equal(blocked[task][key], value), (task, key)


@pytest.mark.parametrize(
    ("method", "params"),
    [CASES[0], CASES[3], ("della", {"density": 0.5, "window": 0.2})],
    ids=["ta", "emr", "della"],
)
def test_small_row_blocks_cut_keys_the_buffers_would_hold(tmp_path, monkeypatch, method, params):
    """Entry-by-entry methods get keys above `ROW_BLOCK_NUMEL` in blocks of that size (small
    buffers and temporaries), keys the reused buffers hold included (DELLA's blocks go on
    drawing where the block before them left off); EMR, whose rescalers add float64 sums per
    block, only keys above `REUSE_MAX_NUMEL`: bit for bit as before."""
    pre, finetuned = pool_files(tmp_path)
    whole, whole_result = run(method, params, pre, finetuned, tmp_path / "whole")
    monkeypatch.setattr(stream_module, "ROW_BLOCK_NUMEL", LIMIT)
    units = record_units(monkeypatch)
    blocked, blocked_result = run(method, params, pre, finetuned, tmp_path / "blocks")
    if method == "emr":
        assert ("emb", None) in units and ("narrow", None) in units
        assert blocked_result.rescalers == whole_result.rescalers
    if method in ("ta", "della"):
        assert ("emb", (0, 2)) in units and ("narrow", (48, 50)) in units
    for task in whole:
        for key, value in whole[task].items():
            assert torch.equal(blocked[task][key], value), (task, key)


def test_a_method_that_needs_whole_tensors_gets_them(tmp_path, monkeypatch):
    """TIES with per-tensor top-k ranks each tensor whole: no row blocks."""
    pre, finetuned = pool_files(tmp_path)
    whole, _ = run("ties", {"k": 0.3, "topk_scope": "tensor"}, pre, finetuned)
    monkeypatch.setattr(stream_module, "REUSE_MAX_NUMEL", LIMIT)
    blocked, _ = run("ties", {"k": 0.3, "topk_scope": "tensor"}, pre, finetuned)
    for task in whole:
        for key, value in whole[task].items():
            assert torch.equal(blocked[task][key], value), (task, key)


def test_the_writer_takes_row_and_column_blocks(tmp_path):
    value = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    packed = torch.arange(30, dtype=torch.uint8).reshape(3, 10)
    entries = [Entry("w", (6, 4), torch.float32), Entry("m", (3, 10), torch.uint8)]
    writer = ShardedWriter(tmp_path, "part", entries)
    writer.write_rows("w", value[4:], 4)
    writer.write_rows("w", value[:4], 0)
    writer.write_columns("m", packed[:, :6], 0)
    with pytest.raises(MergeBenchError, match="never written"):
        ShardedWriter(tmp_path, "other", entries[:1]).close()
    writer.write_columns("m", packed[:, 6:], 6)
    with pytest.raises(MergeBenchError, match=r"'w' part .* does not fit"):
        writer.write_rows("w", value[:3], 4)  # rows 4..7 of 6
    with pytest.raises(MergeBenchError, match=r"'m' part .* does not fit"):
        writer.write_columns("m", packed[:2, :2], 0)  # 2 of 3 rows
    writer.close()
    reader = open_stem(tmp_path, "part")
    assert torch.equal(reader.get("w"), value)
    assert torch.equal(reader.get("m"), packed)


def test_a_writer_with_a_block_missing_is_not_closed(tmp_path):
    writer = ShardedWriter(tmp_path, "part", [Entry("w", (6, 4), torch.float32)])
    writer.write_rows("w", torch.zeros(4, 4), 0)
    with pytest.raises(MergeBenchError, match="1 tensors never written"):
        writer.close()


@pytest.mark.parametrize(("start", "count"), [(0, 3), (2, 4), (5, 3), (6, 2)])
def test_a_vocabulary_view_reads_row_blocks_across_its_extra_rows(start, count):
    stored = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    fill = -torch.arange(4, dtype=torch.float32).reshape(2, 2) - 1
    view = RowsView(StateDictReader({"emb": stored}), {"emb": (6, 8)}, {"emb": fill})
    whole = torch.cat([stored, fill])
    out = torch.empty(count, 2)
    view.read_rows_into("emb", out, start)
    assert torch.equal(out, whole[start : start + count])
