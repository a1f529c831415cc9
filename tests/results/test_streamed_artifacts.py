"""Streamed, sharded artifacts: a merge with `output_dir` writes each tensor as it finishes
into safetensors shards laid out up front, and the result reads back from the files."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mergebench
from mergebench.methods.registry import build_method, method_names
from mergebench.results import LazyTensors, load_result, parse_size
from mergebench.results import artifact as results_artifact
from mergebench.results.shards import Entry, ShardedWriter, index_name
from mergebench.results.switching import TaskSwitcher
from mergebench.util.errors import MergeBenchError
from mergebench.util.hashing import sha256_file

DATA_FREE = sorted(n for n in method_names() if not build_method(n).needs_data)
# Options that make a method runnable on the toy pool below, or fast.
OPTIONS = {"lines": {"layer_pattern": r"layers\.(\d+)\..*"}, "wudi": {"steps": 3}}
# Methods that merge a fixed number of models: the pool's first tasks.
TASK_COUNT = {"slerp": 2}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[str, dict[str, str]]:
    folder = tmp_path_factory.mktemp("pool")
    g = torch.Generator().manual_seed(0)
    pre = {f"layers.{i}.weight": torch.randn(12, 6, generator=g) for i in range(4)}
    pre["layers.0.bias"] = torch.randn(6, generator=g)
    pre["position_ids"] = torch.arange(5)  # integer: copied, not merged
    pre["head.weight"] = torch.randn(3, 6, generator=g)
    save_file(pre, folder / "pre.safetensors")
    finetuned = {}
    for task in ("a", "b", "c"):
        tuned = {
            k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in pre.items()
        }
        save_file(tuned, folder / f"{task}.safetensors")
        finetuned[task] = str(folder / f"{task}.safetensors")
    return str(folder / "pre.safetensors"), finetuned


def _merge(pool, method, **kwargs):
    pre, finetuned = pool
    finetuned = dict(list(finetuned.items())[: TASK_COUNT.get(method)])
    return mergebench.merge(method, pre, finetuned, exclude=[r"head\..*"], progress=False,
                            **OPTIONS.get(method, {}), **kwargs)  # fmt: skip


def test_every_data_free_method_is_covered():
    assert {"task_arithmetic", "ties", "dare", "emr", "mask_rescale", "tall_masks", "wudi",
            "lines", "tsv", "breadcrumbs"} <= set(DATA_FREE)  # fmt: skip
    assert "regmean" not in DATA_FREE


@pytest.mark.parametrize("method", DATA_FREE)
def test_streamed_merge_equals_the_in_memory_one(pool, tmp_path, method):
    in_memory = _merge(pool, method)
    # 300 bytes per shard: every part spreads over several shards.
    streamed = _merge(pool, method, output_dir=tmp_path / "out", shard_size=300)
    for task in in_memory.tasks:
        want, got = in_memory.state_dict(task), streamed.state_dict(task)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), (task, key)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    part = "unified" if in_memory.kind == "task_conditioned" else "model"
    assert f"{part}-00001-of-" in " ".join(sorted(names))
    assert index_name(part) in names
    lazy = streamed.unified if in_memory.kind == "task_conditioned" else streamed.shared
    assert isinstance(lazy, LazyTensors)
    assert load_result(tmp_path / "out").describe()["params"] == in_memory.params


def test_shards_open_with_the_safetensors_library(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "w": torch.randn(10, 7, generator=g),
        "half": torch.randn(33, generator=g).to(torch.bfloat16),
        "flags": torch.rand(9, generator=g) > 0.5,
        "bytes": torch.randint(0, 255, (4, 3), dtype=torch.uint8, generator=g),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    entries = [Entry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, "model", entries, shard_bytes=100, metadata={"x": "1"})
    # Out of order and from several threads: each tensor goes to its own offset.
    threads = [
        threading.Thread(target=writer.write, args=(k, tensors[k])) for k in reversed(tensors)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    files = writer.close()
    index = json.loads((tmp_path / index_name("model")).read_text())
    assert files[-1] == index_name("model") and len(files) > 2
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in entries)
    for key, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / shard), framework="pt") as handle:
            assert handle.metadata() == {"x": "1"}
            assert torch.equal(handle.get_tensor(key), tensors[key]), key
    # A tensor bigger than a shard gets a shard of its own; shards are 8-byte aligned.
    assert index["weight_map"]["w"] not in {index["weight_map"][k] for k in tensors if k != "w"}


def test_writer_refuses_a_tensor_it_did_not_lay_out(tmp_path):
    writer = ShardedWriter(tmp_path, "model", [Entry("w", (2, 3), torch.float32)])
    with pytest.raises(MergeBenchError, match=r"'w' is torch.float32 \[3, 2\]"):
        writer.write("w", torch.zeros(3, 2))
    with pytest.raises(MergeBenchError, match="'v' is not a tensor of this artifact"):
        writer.write("v", torch.zeros(2, 3))
    with pytest.raises(MergeBenchError, match="1 tensors never written"):
        writer.close()


@pytest.mark.parametrize(
    ("value", "size"),
    [(123, 123), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5 kb", 1500), ("7", 7)],
)
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "big", "5 parsecs", "-1MB", 0, True, "0GB"])
def test_parse_size_refuses(value):
    with pytest.raises(MergeBenchError, match="shard_size"):
        parse_size(value)


def test_bad_shard_size_fails_before_reading_checkpoints(tmp_path):
    with pytest.raises(MergeBenchError, match="shard_size: 'lots'"):
        mergebench.merge("emr", tmp_path / "missing.safetensors", {"a": tmp_path / "a"},
                         output_dir=tmp_path / "out", shard_size="lots")  # fmt: skip


def test_failed_streamed_merge_leaves_the_earlier_result_and_no_temp_folder(
    pool, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    _merge(pool, "emr", output_dir=out)
    (out / "NOTES.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from mergebench.results import shards

    real, calls = shards.ShardedWriter.write, []

    def broken(self, key, tensor):
        calls.append(key)
        if len(calls) > 2:  # some tensors are in the new shards already
            raise RuntimeError("killed mid-merge")
        real(self, key, tensor)

    monkeypatch.setattr(shards.ShardedWriter, "write", broken)
    with pytest.raises(RuntimeError, match="killed mid-merge"):
        _merge(pool, "emr", output_dir=out, rescale=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_mask_rescale_scratch_folder_is_removed(pool, tmp_path):
    _merge(pool, "mask_rescale", output_dir=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_switcher_reads_a_file_result_without_copies(pool, tmp_path):
    result = _merge(pool, "emr", output_dir=tmp_path / "out")
    in_memory = _merge(pool, "emr")
    model = _Flat(in_memory.state_dict("a"))
    switcher = TaskSwitcher(result, model)
    assert switcher._unified is result.unified and switcher._pretrained is None
    for task in result.tasks:
        switcher.switch(task)
        want = in_memory.state_dict(task)
        for key, value in model.state_dict().items():
            assert torch.equal(value, want[key]), (task, key)


class _Flat(torch.nn.Module):
    """A module holding arbitrary (dotted) state-dict keys as parameters and buffers."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in state.items():
            *path, name = key.split(".")
            owner = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            if value.is_floating_point():
                owner.register_parameter(name, torch.nn.Parameter(torch.zeros_like(value)))
            else:
                owner.register_buffer(name, torch.zeros_like(value))


def test_a_loaded_result_saves_again_tensor_by_tensor(pool, tmp_path):
    first = _merge(pool, "ties", output_dir=tmp_path / "one")
    first.save(tmp_path / "two", shard_size="1kB")
    again = load_result(tmp_path / "two")
    for key, value in first.state_dict("b").items():
        assert torch.equal(again.state_dict("b")[key], value)


def test_format_version_2_folders_still_load(pool, tmp_path):
    """A result saved before shards (one file per part, no index) loads as it did."""
    in_memory = _merge(pool, "emr")
    folder = in_memory.save(tmp_path / "v2")
    for index in folder.glob("*.index.json"):
        index.unlink()
    meta = json.loads((folder / "result.json").read_text())
    meta["format_version"] = 2  # with its sha256 digests, of the files and of the base tensors
    del meta["checksum"], meta["manifest"]
    files = sorted(p.name for p in folder.iterdir() if p.name != "result.json")
    meta["manifest"] = {"files": {name: {"sha256": sha256_file(folder / name),
                                         "size": (folder / name).stat().st_size}
                                  for name in files}}  # fmt: skip
    meta["pretrained_digest"] = results_artifact.pretrained_digest(
        in_memory.pretrained, list(in_memory.unified), "sha256"
    )
    meta["checksum"] = results_artifact.meta_checksum(meta)
    (folder / "result.json").write_text(json.dumps(meta))
    loaded = load_result(folder)
    for key, value in in_memory.state_dict("c").items():
        assert torch.equal(loaded.state_dict("c")[key], value)


def test_streamed_files_match_the_manifest(pool, tmp_path):
    _merge(pool, "dare", output_dir=tmp_path / "out", shard_size=200)
    meta = json.loads((tmp_path / "out" / "result.json").read_text())
    on_disk = {p.name for p in (tmp_path / "out").iterdir()} - {"result.json"}
    assert set(meta["manifest"]["files"]) == on_disk
    load_result(tmp_path / "out", verify=True)  # every digest checked
    shard = sorted(Path(tmp_path / "out").glob("model-0000*"))[0]
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(MergeBenchError, match="changed since the result was saved"):
        load_result(tmp_path / "out")


@pytest.mark.parametrize("method", ["ties", "emr", "dare", "mask_rescale"])
def test_outsized_keys_read_into_buffers_of_their_own(pool, tmp_path, monkeypatch, method):
    """Keys above `REUSE_MAX_NUMEL` (an LLM's embedding) skip the reused buffers: same result.
    (Through the stream: float32 files would go span by span, tests/engine/test_spans.py.)"""
    from mergebench.engine import spans, stream

    monkeypatch.setattr(spans, "ENABLED", False)

    want = _merge(pool, method)
    monkeypatch.setattr(stream, "REUSE_MAX_NUMEL", 20)  # the 12x6 matrices are outsized now
    loads = []
    real = stream.TaskVectorStream._load

    def spy(self, unit, buffers):
        loaded = real(self, unit, buffers)
        loads.append(
            (
                unit.key,
                buffers is not None
                and loaded.pretrained.data_ptr() == buffers.pretrained.data_ptr(),
            )
        )
        return loaded

    monkeypatch.setattr(stream.TaskVectorStream, "_load", spy)
    got = _merge(pool, method, output_dir=tmp_path / "out")
    assert dict(loads)["layers.0.bias"] is True  # 6 entries: a reused buffer
    assert dict(loads)["layers.0.weight"] is False  # 72 entries, rows of 6 uncut: its own
    for task in want.tasks:
        for key, value in want.state_dict(task).items():
            assert torch.equal(got.state_dict(task)[key], value), (task, key)
