"""`load_result`, `save`, checkpoints and the Python API given bad input: a
`MergeBenchError` naming the culprit, never wrong weights, never a raw exception."""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergebench
from bad_input.conftest import HEAD, record, tiny_models, tree_hash
from mergebench.engine.checkpoints import open_checkpoint
from mergebench.util.errors import MergeBenchError
from mergebench.util.hashing import sha256_file


def emr_saved(tmp_path: Path, pre, finetuned, name: str = "out") -> Path:
    result = mergebench.merge("emr", pre, finetuned, exclude=HEAD, progress=False)
    return result.save(tmp_path / name)


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "result.json").read_text())
    change(meta)
    (folder / "result.json").write_text(json.dumps(meta))


def as_version_1(folder: Path) -> None:
    """Rewrite a saved result as format version 1 wrote it (no manifest, "<task>::<key>")."""
    meta = json.loads((folder / "result.json").read_text())
    tasks = meta["tasks"]
    for key in ("manifest", "checksum", "pretrained_digest"):
        meta.pop(key, None)
    meta["format_version"] = 1
    (folder / "result.json").write_text(json.dumps(meta))
    heads = folder / "task_specific.safetensors"
    if heads.exists():
        flat = load_file(heads)
        renamed = {}
        for name, tensor in flat.items():
            index, _, key = name.partition("::")
            renamed[f"{tasks[int(index)]}::{key}"] = tensor
        save_file(renamed, heads)


def raises(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(MergeBenchError, match=match) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    record(message)
    return message


# --- issue 3: "::" in task names ---------------------------------------------------------------
@pytest.mark.parametrize("names", [("x::y", "x", "z"), ("x::y", "c", "z")])
def test_task_names_with_separator_round_trip(tmp_path, models, names):
    pre, finetuned = models
    renamed = dict(zip(names, finetuned.values(), strict=True))
    for method in ("emr", "task_arithmetic"):
        result = mergebench.merge(method, pre, renamed, exclude=HEAD, progress=False)
        loaded = mergebench.load_result(result.save(tmp_path / method))
        for task in names:
            head = loaded.state_dict(task)["classifier.weight"]
            assert torch.equal(head, renamed[task]["classifier.weight"]), (method, task)


# --- issue 4: tampered artifacts -------------------------------------------------------------
def test_task_specific_file_removed(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    (out / "task_specific.safetensors").unlink()
    raises("task_specific.safetensors: missing", mergebench.load_result, out)


def test_tasks_reordered(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    edit_meta(out, lambda m: m["tasks"].reverse())
    raises("result.json: content changed", mergebench.load_result, out)


def test_tasks_reordered_in_a_version_1_result(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    as_version_1(out)
    edit_meta(out, lambda m: m["tasks"].reverse())
    loaded = mergebench.load_result(out)  # heads are found by name: still right
    for task, state in models[1].items():
        assert torch.equal(loaded.state_dict(task)["classifier.weight"], state["classifier.weight"])


def test_format_version_from_the_future(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    edit_meta(out, lambda m: m.update(format_version=99))
    raises("format version 99 is newer", mergebench.load_result, out)


def test_nan_rescaler(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    text = (out / "result.json").read_text()
    meta = json.loads(text)
    value = json.dumps(meta["rescalers"]["a"])
    (out / "result.json").write_text(text.replace(f'"a": {value}', '"a": NaN', 1))
    raises("result.json", mergebench.load_result, out)
    as_version_1(out)
    edit_meta(out, lambda m: m["rescalers"].update(a=float("nan")))
    raises("rescaler of task 'a' is nan", mergebench.load_result, out)


def test_pretrained_override_is_another_model(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    other, _ = tiny_models(seed=1)
    raises("not the pretrained model", mergebench.load_result, out, pretrained=other)
    mergebench.load_result(out, pretrained=models[0])  # the right one passes


# --- issue 8: load_result tracebacks ---------------------------------------------------------
def test_result_json_is_a_list(tmp_path):
    (tmp_path / "result.json").write_text("[]")
    raises("result.json: not a mergebench result", mergebench.load_result, tmp_path)


def test_task_added(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    as_version_1(out)
    edit_meta(out, lambda m: m["tasks"].append("d"))
    raises(r"masks.safetensors: mask of .* \(4 tasks\)", mergebench.load_result, out)


def test_task_renamed(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    as_version_1(out)
    edit_meta(out, lambda m: m["tasks"].__setitem__(0, "aa"))
    raises("task_specific.safetensors: tensor 'a::classifier.weight'", mergebench.load_result, out)


def test_string_rescaler(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    as_version_1(out)
    edit_meta(out, lambda m: m["rescalers"].update(b="1.0"))
    raises("rescaler of task 'b' is '1.0', not a number", mergebench.load_result, out)


def test_too_small_masks(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    as_version_1(out)
    masks = load_file(out / "masks.safetensors")
    save_file({k: v[:, :1].contiguous() for k, v in masks.items()}, out / "masks.safetensors")
    raises("masks.safetensors: mask of", mergebench.load_result, out)


def test_too_small_masks_with_manifest(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    masks = load_file(out / "masks.safetensors")
    save_file({k: v[:, :1].contiguous() for k, v in masks.items()}, out / "masks.safetensors")
    raises("masks.safetensors: changed since the result was saved", mergebench.load_result, out)


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "result").write_text("x")
    raises("is a file, not a mergebench result folder", mergebench.load_result, tmp_path / "result")


def test_pretrained_override_of_wrong_shape(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    pre = dict(models[0])
    pre["layer.weight"] = torch.zeros(5, 6)
    raises("tensor 'layer.weight' has shape", mergebench.load_result, out, pretrained=pre)


def test_pretrained_override_lacking_a_key(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    pre = {k: v for k, v in models[0].items() if k != "layer.bias"}
    raises("no tensor 'layer.bias'", mergebench.load_result, out, pretrained=pre)


def test_model_file_truncated(tmp_path, models):
    result = mergebench.merge("ties", *models, exclude=HEAD, progress=False)
    out = result.save(tmp_path / "out")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:-4])
    raises("model.safetensors: changed since", mergebench.load_result, out)


def test_model_file_bit_flipped(tmp_path, models):
    result = mergebench.merge("ties", *models, exclude=HEAD, progress=False)
    out = result.save(tmp_path / "out")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    raises("model.safetensors: changed since.*blake3 mismatch", mergebench.load_result, out)


def as_version_3(folder: Path) -> None:
    """Rewrite a saved result's manifest as format version 3 wrote it: sha256 per file."""
    from mergebench.results.artifact import meta_checksum

    meta = json.loads((folder / "result.json").read_text())
    for name, info in meta["manifest"]["files"].items():
        del info["blake3"]
        info["sha256"] = sha256_file(folder / name)
    meta["format_version"] = 3
    meta["checksum"] = meta_checksum(meta)
    (folder / "result.json").write_text(json.dumps(meta))


def test_a_version_3_result_is_checked_by_its_sha256(tmp_path, models):
    result = mergebench.merge("ties", *models, exclude=HEAD, progress=False)
    out = result.save(tmp_path / "out")
    meta = json.loads((out / "result.json").read_text())
    assert meta["format_version"] == 4
    assert set(meta["manifest"]["files"]["model.safetensors"]) == {"blake3", "size"}
    as_version_3(out)
    loaded = mergebench.load_result(out)  # the sha256s check out
    assert loaded.state_dict().keys() == result.state_dict().keys()
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    raises("model.safetensors: changed since.*sha256 mismatch", mergebench.load_result, out)
    mergebench.load_result(out, verify=False)  # sizes only: the user's choice


@pytest.mark.parametrize(
    "entry, message",
    [
        ("size only", "manifest entry 'model.safetensors' records no blake3 digest"),
        ("sha256 only", "manifest entry 'model.safetensors' records no blake3 digest"),
        (["x"], "manifest entry 'model.safetensors' is not an object"),
    ],
)
def test_a_manifest_entry_without_a_digest(tmp_path, models, entry, message):
    from mergebench.results.artifact import meta_checksum

    result = mergebench.merge("ties", *models, exclude=HEAD, progress=False)
    out = result.save(tmp_path / "out")
    meta = json.loads((out / "result.json").read_text())
    size = (out / "model.safetensors").stat().st_size
    if entry == "size only":
        entry = {"size": size}
    elif entry == "sha256 only":  # another algorithm than the format's: not taken
        entry = {"size": size, "sha256": sha256_file(out / "model.safetensors")}
    meta["manifest"]["files"]["model.safetensors"] = entry
    meta["checksum"] = meta_checksum(meta)
    (out / "result.json").write_text(json.dumps(meta))
    raises(message, mergebench.load_result, out)


def test_method_edited_in_result_json(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    edit_meta(out, lambda m: m.update(method="ties"))
    raises("result.json: content changed", mergebench.load_result, out)


def test_version_1_result_still_loads(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    expected = mergebench.load_result(out).state_dict("b")
    as_version_1(out)
    loaded = mergebench.load_result(out).state_dict("b")
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


# --- issue 10: leftovers ----------------------------------------------------------------------
def test_save_to_empty_path(tmp_path, models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = mergebench.merge("ties", *models, exclude=HEAD, progress=False)
    raises("empty path", result.save, "")
    assert list(tmp_path.iterdir()) == []


def test_save_into_the_current_folder(tmp_path, models, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for method in ("ties", "emr"):
        result = mergebench.merge(method, *models, exclude=HEAD, progress=False)
        result.save(".")
        assert mergebench.load_result(".").method == method
    assert [p.name for p in tmp_path.iterdir()] == ["here"]
    assert not [p for p in (tmp_path / "here").iterdir() if p.name.startswith(".")]


def test_stale_temp_folders_of_a_dead_save_are_removed_only_when_ours(tmp_path, models):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    ours = tmp_path / ".out.tmp-abc123"
    ours.mkdir()
    (ours / "model.safetensors").write_bytes(b"half")
    (ours / ".mergebench-temp").write_text(f"{pid} {os.uname().nodename}\n")
    lookalike = tmp_path / ".out.tmp-user"  # no marker: not ours, never touched
    lookalike.mkdir()
    (lookalike / "data").write_text("keep")
    result = mergebench.merge("ties", *models, exclude=HEAD, progress=False)
    result.save(tmp_path / "out")
    assert not ours.exists()
    assert (lookalike / "data").read_text() == "keep"


# --- issue 11: malicious pickle ---------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_pickle(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"w": _Evil()}, handle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = raises("holds Python code or objects", open_checkpoint, path)
    assert not caught, [str(w.message) for w in caught]
    assert "was not loaded" in message and "mergebench-convert --trust-pickle" in message
    assert "will likely succeed" not in message


# --- issue 5: sharded checkpoints --------------------------------------------------------------
def write_index(folder: Path, weight_map: dict[str, str]) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_key_in_two_shards(tmp_path):
    save_file({"w": torch.ones(2), "v": torch.ones(1)}, tmp_path / "s1.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "s2.safetensors")
    write_index(tmp_path, {"w": "s1.safetensors", "v": "s2.safetensors"})
    raises("tensor 'w' is also in", open_checkpoint, tmp_path)


def test_index_points_to_the_wrong_shard(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"v": torch.zeros(2)}, tmp_path / "s2.safetensors")
    write_index(tmp_path, {"w": "s2.safetensors", "v": "s2.safetensors", "u": "s1.safetensors"})
    raises(
        "s1.safetensors: holds tensor 'w', which the shard index puts in s2",
        open_checkpoint,
        tmp_path,
    )


def test_index_entry_outside_the_folder(tmp_path):
    inner = tmp_path / "model"
    inner.mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    write_index(inner, {"w": "../a.safetensors"})
    raises("'../a.safetensors' is outside", open_checkpoint, inner)


def test_index_entry_absolute(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    write_index(tmp_path, {"w": str(tmp_path / "a.safetensors")})
    raises("is outside the index's folder", open_checkpoint, tmp_path)


def test_overlapping_offsets(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    text = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(12))
    raises("tensors 'a' and 'b' overlap", open_checkpoint, path)


def test_index_is_not_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{")
    raises("not a valid shard index", open_checkpoint, tmp_path)


# --- the Python API ----------------------------------------------------------------------------
def test_api_scaling_overflowing_float32(models):
    raises(
        "ties.scaling.*too large", mergebench.merge, "ties", *models, exclude=HEAD, scaling=1e308
    )


def test_api_finetuned_a_list(models):
    raises("finetuned: expected a mapping", mergebench.merge, "ties", models[0], [models[1]["a"]])


def test_api_exclude_a_string(models):
    raises("exclude: expected a list", mergebench.merge, "ties", *models, exclude="classifier")


def test_api_unknown_option(models):
    raises("unknown option 'scale'", mergebench.merge, "ties", *models, exclude=HEAD, scale=1)


def test_api_empty_task_name(models):
    pre, finetuned = models
    raises("task names", mergebench.merge, "ties", pre, {"": finetuned["a"]}, exclude=HEAD)


def test_api_failure_changes_nothing(tmp_path, models):
    out = emr_saved(tmp_path, *models)
    before = tree_hash(tmp_path)
    result = mergebench.merge("ties", *models, exclude=HEAD, progress=False)
    raises("not empty and not a mergebench result", result.save, tmp_path)
    assert tree_hash(tmp_path) == before
    assert mergebench.load_result(out).method == "emr"
