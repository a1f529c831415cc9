"""Saving and loading merge results: bit-exact, compact masks, atomic writes."""

from __future__ import annotations

import errno
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import mergebench
from mergebench.engine.bits import pack_bits, unpack_bits
from mergebench.results import artifact as results_artifact
from mergebench.util import hashing
from mergebench.util.errors import MergeBenchError

HEAD = [r"classifier\..*"]


def assert_same_results(a, b, tasks):
    for task in tasks:
        left, right = a.state_dict(task), b.state_dict(task)
        assert set(left) == set(right)
        for key in left:
            assert left[key].dtype == right[key].dtype, key
            assert torch.equal(left[key], right[key]), (task, key)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5, 2), (1000,)])
def test_bit_packing_round_trips(shape):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand((4, *shape), generator=g) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape == (4, math.ceil(math.prod(shape) / 8))
    assert torch.equal(unpack_bits(packed, shape), mask)
    assert torch.equal(unpack_bits(packed[2], shape), mask[2])


def test_bit_order_is_little_endian():
    mask = torch.tensor([[True, False, False, False, False, False, False, False, True]])
    assert pack_bits(mask).tolist() == [[1, 1]]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "emr", "mask_rescale"])
def test_save_and_load_are_bit_exact_in_memory_pretrained(tmp_path, tiny_models, method):
    pre, finetuned = tiny_models
    result = mergebench.merge(method, pre, finetuned, exclude=HEAD, progress=False)
    result.save(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "result.json").read_text())
    assert meta["method"] == method and meta["tasks"] == ["a", "b", "c"]
    assert meta["version"] == mergebench.__version__
    loaded = mergebench.load_result(tmp_path / "out")
    assert loaded.kind == result.kind and loaded.params == result.params
    assert_same_results(result, loaded, "abc")


def test_task_conditioned_result_references_pretrained_file(tmp_path, tiny_models):
    pre, finetuned = tiny_models
    save_file(pre, tmp_path / "pre.safetensors")
    result = mergebench.merge(
        "emr", str(tmp_path / "pre.safetensors"), finetuned, exclude=HEAD, progress=False
    )
    result.save(tmp_path / "out")
    assert not (tmp_path / "out" / "pretrained.safetensors").exists()
    loaded = mergebench.load_result(tmp_path / "out")
    assert loaded.rescalers == result.rescalers
    assert_same_results(result, loaded, "abc")
    # A changed pretrained file is detected rather than silently used.
    changed = dict(pre, **{"out.weight": pre["out.weight"] + 1})
    save_file(changed, tmp_path / "pre.safetensors")
    with pytest.raises(MergeBenchError, match="pre.safetensors.*changed since .*out was saved"):
        mergebench.load_result(tmp_path / "out")
    mergebench.load_result(tmp_path / "out", verify=False)  # the user's call
    # The same tensors written again (another layout, other metadata) are the same model.
    save_file(dict(reversed(list(pre.items()))), tmp_path / "pre.safetensors", {"note": "x"})
    assert_same_results(result, mergebench.load_result(tmp_path / "out"), "abc")
    (tmp_path / "pre.safetensors").unlink()
    with pytest.raises(MergeBenchError, match="not found; pass pretrained"):
        mergebench.load_result(tmp_path / "out")
    again = mergebench.load_result(tmp_path / "out", pretrained=pre)
    assert_same_results(result, again, "abc")


def test_results_that_recorded_the_pretrained_files_sha256_still_check_it(tmp_path, tiny_models):
    """Before 2026-11-26 a result recorded each pretrained file's sha256 (a second pass over
    the weights): such results keep checking it, byte for byte."""
    pre, finetuned = tiny_models
    save_file(pre, tmp_path / "pre.safetensors")
    result = mergebench.merge(
        "emr", str(tmp_path / "pre.safetensors"), finetuned, exclude=HEAD, progress=False
    )
    folder = result.save(tmp_path / "out")
    meta = json.loads((folder / "result.json").read_text())
    assert "sha256" not in meta["pretrained"]  # one pass: the digest alone
    meta["pretrained"]["sha256"] = [hashing.sha256_file(tmp_path / "pre.safetensors")]
    meta["checksum"] = results_artifact.meta_checksum(meta)
    (folder / "result.json").write_text(json.dumps(meta))
    assert_same_results(result, mergebench.load_result(folder), "abc")
    save_file(pre, tmp_path / "pre.safetensors", {"note": "same tensors, other bytes"})
    with pytest.raises(
        MergeBenchError, match="pre.safetensors: pretrained checkpoint changed.*sha256"
    ):
        mergebench.load_result(folder)
    meta["pretrained"]["sha256"] = []  # one file, no hash: malformed
    meta["checksum"] = results_artifact.meta_checksum(meta)
    (folder / "result.json").write_text(json.dumps(meta))
    with pytest.raises(MergeBenchError, match="malformed 'pretrained' entry"):
        mergebench.load_result(folder)


def test_mask_file_is_about_n_times_p_over_8_bytes(tmp_path):
    n_tasks, p = 3, 80_000
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.zeros(p)}
    finetuned = {f"t{i}": {"w": torch.randn(p, generator=g)} for i in range(n_tasks)}
    mergebench.merge("emr", pre, finetuned, progress=False).save(tmp_path / "out")
    mask_bytes = (tmp_path / "out" / "masks.safetensors").stat().st_size
    unified_bytes = (tmp_path / "out" / "unified.safetensors").stat().st_size
    assert n_tasks * p / 8 <= mask_bytes <= n_tasks * p / 8 + 512
    assert 4 * p <= unified_bytes <= 4 * p + 512


def test_emr_without_masks_stores_no_mask_file(tmp_path, tiny_models):
    pre, finetuned = tiny_models
    result = mergebench.merge("emr", pre, finetuned, exclude=HEAD, mask=False, progress=False)
    result.save(tmp_path / "out")
    assert not (tmp_path / "out" / "masks.safetensors").exists()
    assert_same_results(result, mergebench.load_result(tmp_path / "out"), "abc")


def test_save_never_clobbers_foreign_folders_and_replaces_results(tmp_path, tiny_models):
    pre, finetuned = tiny_models
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = mergebench.merge("task_arithmetic", pre, finetuned, exclude=HEAD, progress=False)
    with pytest.raises(MergeBenchError, match="not a mergebench result"):
        result.save(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    result.save(tmp_path / "out")
    other = mergebench.merge("weight_averaging", pre, finetuned, exclude=HEAD, progress=False)
    other.save(tmp_path / "out")  # replacing an older result is fine
    assert mergebench.load_result(tmp_path / "out").method == "weight_averaging"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_save_leaves_nothing_behind(tmp_path, tiny_models, monkeypatch):
    pre, finetuned = tiny_models
    result = mergebench.merge("emr", pre, finetuned, exclude=HEAD, progress=False)

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # A failed write is now a MergeBenchError naming the folder (one line in the CLI).
    monkeypatch.setattr("mergebench.results.publish.file_manifest", boom)
    with pytest.raises(MergeBenchError, match="no space left on device"):
        result.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_result_rejects_non_results(tmp_path):
    with pytest.raises(MergeBenchError, match="result.json: not found"):
        mergebench.load_result(tmp_path)
    (tmp_path / "result.json").write_text("{broken")
    with pytest.raises(MergeBenchError, match="invalid JSON"):
        mergebench.load_result(tmp_path)
