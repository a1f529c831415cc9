"""Digests remembered between processes (`util.hashing.remembered_digest`): the pretrained
weights' digest of a task-conditioned result is computed once per unchanged file, never
reused for a file that was written since, a renamed or other file, or another key set."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergebench
from mergebench.engine.checkpoints import open_checkpoint
from mergebench.engine.reader import StateDictReader
from mergebench.results import artifact
from mergebench.util import hashing
from mergebench.util.errors import MergeBenchError

DIGEST = "ab" * 32


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Counted:
    def __init__(self, value: str = DIGEST) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> str:
        self.calls += 1
        return self.value


def settled_file(path: Path, data: bytes = b"weights") -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def no_racy_window(monkeypatch):
    monkeypatch.setattr(hashing, "RACY_NS", -(10**12))


def test_computed_once_then_remembered(tmp_path, no_racy_window):
    path = settled_file(tmp_path / "w")
    compute = Counted()
    assert hashing.remembered_digest([path], "what", compute) == DIGEST
    assert hashing.remembered_digest([path], "what", compute) == DIGEST
    assert compute.calls == 1
    # another `what` (say, another key set) is another entry
    assert hashing.remembered_digest([path], "other", compute) == DIGEST
    assert compute.calls == 2


def test_a_write_since_is_seen_even_with_the_old_mtime_put_back(tmp_path, no_racy_window):
    path = settled_file(tmp_path / "w")
    compute = Counted()
    hashing.remembered_digest([path], "what", compute)
    stat = path.stat()
    time.sleep(0.01)
    path.write_bytes(b"WEIGHTS")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime as before, ctime not
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    hashing.remembered_digest([path], "what", compute)
    assert compute.calls == 2


def test_another_file_with_the_same_bytes_is_hashed_again(tmp_path, no_racy_window):
    first, second = settled_file(tmp_path / "a"), settled_file(tmp_path / "b")
    compute = Counted()
    hashing.remembered_digest([first], "what", compute)
    hashing.remembered_digest([second], "what", compute)
    hashing.remembered_digest([first, second], "what", compute)
    assert compute.calls == 3


def test_files_changed_in_the_last_seconds_are_not_remembered(tmp_path):
    path = settled_file(tmp_path / "w")  # just written: inside RACY_NS
    compute = Counted()
    hashing.remembered_digest([path], "what", compute)
    hashing.remembered_digest([path], "what", compute)
    assert compute.calls == 2


def test_a_file_changed_while_it_was_hashed_is_not_remembered(tmp_path, no_racy_window):
    path = settled_file(tmp_path / "w")

    def compute() -> str:
        time.sleep(0.01)
        path.write_bytes(b"changed")
        return DIGEST

    hashing.remembered_digest([path], "what", compute)
    assert not list((hashing.cache_root() / "digests").glob("*"))


def test_a_damaged_entry_is_recomputed_and_replaced(tmp_path, no_racy_window):
    path = settled_file(tmp_path / "w")
    compute = Counted()
    hashing.remembered_digest([path], "what", compute)
    (entry,) = (hashing.cache_root() / "digests").iterdir()
    entry.write_text("not a digest\n")
    assert hashing.remembered_digest([path], "what", compute) == DIGEST
    assert compute.calls == 2
    assert entry.read_text().strip() == DIGEST


def test_an_unwritable_cache_costs_the_recomputation_only(tmp_path, monkeypatch, no_racy_window):
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("x")
    monkeypatch.setenv("MERGEBENCH_CACHE", str(blocker))
    path = settled_file(tmp_path / "w")
    compute = Counted()
    assert hashing.remembered_digest([path], "what", compute) == DIGEST
    assert hashing.remembered_digest([path], "what", compute) == DIGEST
    assert compute.calls == 2


def test_missing_files_or_none_compute_without_remembering(tmp_path):
    compute = Counted()
    assert hashing.remembered_digest([], "what", compute) == DIGEST
    assert hashing.remembered_digest([tmp_path / "missing"], "what", compute) == DIGEST
    assert compute.calls == 2


def pretrained_file(folder: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(5, 4, generator=g), "b": torch.randn(3, generator=g).half()}
    save_file(state, folder / "pre.safetensors")
    return folder / "pre.safetensors"


def test_pretrained_digest_is_the_tensors_digest_and_is_remembered(tmp_path, monkeypatch,
                                                                   no_racy_window):  # fmt: skip
    path = pretrained_file(tmp_path)
    reader = open_checkpoint(path)
    expected = artifact._tensors_digest(reader, ["a", "b"])
    calls = []
    real = artifact._tensors_digest
    monkeypatch.setattr(artifact, "_tensors_digest",
                        lambda source, keys, algorithm: calls.append(keys)
                        or real(source, keys, algorithm))  # fmt: skip
    assert artifact.pretrained_digest(reader, ["b", "a"]) == expected
    assert artifact.pretrained_digest(open_checkpoint(path), ["a", "b"]) == expected
    assert len(calls) == 1
    # other keys, or tensors that are not a safetensors file's bytes: computed
    assert artifact.pretrained_digest(reader, ["a"]) == real(reader, ["a"])
    in_memory = StateDictReader({"a": reader.get("a"), "b": reader.get("b")}, "memory")
    assert artifact.pretrained_digest(in_memory, ["a", "b"]) == expected
    assert len(calls) == 3


def expert_files(folder: Path) -> dict[str, Path]:
    pre = {"w": torch.randn(64, 8), "v": torch.randn(100)}
    save_file(pre, folder / "pre.safetensors")
    experts = {}
    for t in range(3):
        state = {k: v + 0.1 * torch.randn(v.shape) for k, v in pre.items()}
        save_file(state, folder / f"t{t}.safetensors")
        experts[f"t{t}"] = folder / f"t{t}.safetensors"
    return experts


def test_a_changed_pretrained_file_is_still_refused_at_load(tmp_path, monkeypatch,
                                                           no_racy_window):  # fmt: skip
    torch.manual_seed(0)
    experts = expert_files(tmp_path)
    pre = tmp_path / "pre.safetensors"
    mergebench.merge("emr", pre, experts, progress=False, output_dir=tmp_path / "out")
    mergebench.load_result(tmp_path / "out", pretrained=pre)  # remembered, then used
    assert list((hashing.cache_root() / "digests").iterdir())
    state = {"w": torch.randn(64, 8), "v": torch.randn(100)}
    save_file(state, pre)  # same names, shapes and size; other weights
    with pytest.raises(MergeBenchError, match="pre"):
        mergebench.load_result(tmp_path / "out", pretrained=pre)


def test_pretrained_digest_hashes_each_tensors_header_then_bytes_with_either_algorithm(
    tmp_path, no_racy_window
):
    import hashlib
    import json

    import blake3

    path = pretrained_file(tmp_path)
    reader = open_checkpoint(path)
    stream = b""
    for key in ("a", "b"):  # key order, whatever order the caller gives
        tensor = reader.get(key)
        stream += json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode()
        stream += tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    b3, sha = blake3.blake3(stream).hexdigest(), hashlib.sha256(stream).hexdigest()
    assert artifact.pretrained_digest(reader, ["b", "a"]) == b3  # format 4's
    assert artifact.pretrained_digest(reader, ["b", "a"], "sha256") == sha  # format 3's
    # each remembered under its own algorithm: neither answers for the other
    assert artifact.pretrained_digest(open_checkpoint(path), ["a", "b"]) == b3
    assert artifact.pretrained_digest(open_checkpoint(path), ["a", "b"], "sha256") == sha
    assert len(list((hashing.cache_root() / "digests").iterdir())) == 2


def test_a_format_3_result_checks_its_sha256_pretrained_digest(tmp_path, no_racy_window):
    import json

    torch.manual_seed(0)
    experts = expert_files(tmp_path)
    pre = tmp_path / "pre.safetensors"
    out = tmp_path / "out"
    mergebench.merge("emr", pre, experts, progress=False, output_dir=out)
    meta = json.loads((out / "result.json").read_text())
    assert meta["format_version"] == 4
    keys = list(mergebench.load_result(out).unified)
    assert meta["pretrained_digest"] == artifact.pretrained_digest(open_checkpoint(pre), keys)
    # as format 3 wrote it: sha256 digests (the manifest's and the pretrained tensors')
    meta["format_version"] = 3
    meta["pretrained_digest"] = artifact.pretrained_digest(open_checkpoint(pre), keys, "sha256")
    for name, info in meta["manifest"]["files"].items():
        info["sha256"] = hashing.sha256_file(out / name)
        del info["blake3"]
    meta["checksum"] = artifact.meta_checksum(meta)
    (out / "result.json").write_text(json.dumps(meta))
    mergebench.load_result(out, pretrained=pre)  # checked with sha256: the same tensors
    save_file({"w": torch.randn(64, 8), "v": torch.randn(100)}, pre)  # other weights
    with pytest.raises(MergeBenchError, match="its weights differ"):
        mergebench.load_result(out, pretrained=pre)
