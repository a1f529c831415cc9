"""The digest a `ShardedWriter` computes while tensors come in (`_PrefixDigest`, BLAKE3 since
format version 4): the file's own, whatever the order of the writes, handed to `file_digest`
once; never a stale one. And `file_digest` itself: BLAKE3 as published, sha256 for old
manifests, and a remembered digest is only ever used for its own algorithm."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import blake3
import pytest
import torch

from mergebench.results.shards import Entry, ShardedWriter, _PrefixDigest
from mergebench.util import hashing

KEYS = {f"k{i}": (i % 5 + 1, 7) for i in range(40)}


def file_b3(path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def write_model(folder, order: list[str], shard_bytes: int = 10**9, rewrite: str | None = None):
    entries = [Entry(k, shape, torch.float32) for k, shape in KEYS.items()]
    writer = ShardedWriter(folder, "model", entries, shard_bytes)
    for key in order:
        writer.write(key, torch.full(KEYS[key], float(len(key))))
        if key == rewrite:
            writer.write(key, torch.full(KEYS[key], -1.0))
    return writer.close()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("shard_bytes", [10**9, 500])
def test_digest_of_every_shard_is_remembered_once(tmp_path, shuffle, shard_bytes):
    order = list(KEYS)
    if shuffle:
        random.Random(0).shuffle(order)
    files = write_model(tmp_path, order, shard_bytes)
    shards = [tmp_path / name for name in files if name.endswith(".safetensors")]
    assert (len(shards) == 1) == (shard_bytes > 10**6)
    for path in shards:
        state = (hashing._state(path), "blake3")
        assert hashing._known[state] == file_b3(path)
        assert hashing.file_digest(path) == file_b3(path)
        assert state not in hashing._known  # used once: the next call reads the file


def test_a_rewritten_piece_spoils_the_digest(tmp_path):
    order = list(KEYS)
    write_model(tmp_path, order, rewrite="k3")
    path = tmp_path / "model.safetensors"
    assert (hashing._state(path), "blake3") not in hashing._known
    assert hashing.file_digest(path) == file_b3(path)


@pytest.mark.parametrize("keep", [0, 20_000, 1 << 26])  # read back / some kept / all kept
def test_prefix_digest_waits_for_gaps_and_refuses_incomplete_files(tmp_path, monkeypatch, keep):
    monkeypatch.setattr(_PrefixDigest, "_KEEP_BYTES", keep)
    monkeypatch.setattr(_PrefixDigest, "_CHUNK", 7_000)  # read back in several reads
    path = tmp_path / "f"
    data = os.urandom(100_000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = _PrefixDigest(fd, len(data))
        for start in (90_000, 10_000, 50_000, 0, 30_000, 70_000):  # 20 KB pieces, any order
            end = start + (10_000 if start in (0, 90_000) else 20_000)
            digest.written(start, data[start:end])
        assert digest._kept == 0 and not digest._pending
        assert digest.finish() == blake3.blake3(data).hexdigest()
        gap = _PrefixDigest(fd, len(data))
        gap.written(0, data[:50_000])
        gap.written(60_000, data[60_000:])
        assert gap.finish() is None
        twice = _PrefixDigest(fd, len(data))
        twice.written(50_000, data[50_000:])
        twice.written(50_000, data[50_000:])
        twice.written(0, data[:50_000])
        assert twice.finish() is None
        overlap = _PrefixDigest(fd, len(data))  # a piece past the prefix written over
        overlap.written(50_000, data[50_000:])
        overlap.written(60_000, data[60_000:70_000])
        overlap.written(0, data[:50_000])
        assert overlap.finish() is None
        stopped = _PrefixDigest(fd, len(data))
        stopped.written(50_000, data[50_000:])
        assert stopped._kept == (50_000 if keep > 50_000 else 0) and stopped._pending
        stopped.stop()
        assert stopped._kept == 0 and not stopped._pending
        assert stopped.finish() is None
    finally:
        os.close(fd)


def test_prefix_digest_from_many_threads_in_any_order(tmp_path):
    """Pieces written by 4 threads, each taking the next of 400 in turn and finishing them
    in its own time: the file's digest, with at most `_KEEP_BYTES` kept at once."""
    path = tmp_path / "f"
    data = os.urandom(400 * 4096)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    digest, lock, most = _PrefixDigest(fd, len(data)), threading.Lock(), [0]
    middle = list(range(100, 200))
    random.Random(1).shuffle(middle)  # a stretch taken out of order
    starts = [*range(100), *middle, *range(200, 400)]

    def worker() -> None:
        while True:
            with lock:
                if not starts:
                    return
                piece = starts.pop(0)
            time.sleep(random.random() * 1e-4)
            digest.written(piece * 4096, data[piece * 4096 : (piece + 1) * 4096])
            most[0] = max(most[0], digest._kept)

    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert digest.finish() == blake3.blake3(data).hexdigest()
        assert most[0] <= _PrefixDigest._KEEP_BYTES
    finally:
        os.close(fd)


def test_a_digest_is_forgotten_when_its_file_is_written_again(tmp_path):
    write_model(tmp_path, list(KEYS))
    path = tmp_path / "model.safetensors"
    state = (hashing._state(path), "blake3")
    assert state in hashing._known
    entries = [Entry(k, shape, torch.float32) for k, shape in KEYS.items()]
    ShardedWriter(tmp_path, "model", entries).abort()
    assert state not in hashing._known
    assert (hashing._state(path), "blake3") not in hashing._known


def test_file_digest_is_blake3_as_published_and_sha256_on_request(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    # BLAKE3's published test vector for the empty input, and sha256's.
    assert hashing.file_digest(empty) == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )
    assert hashing.sha256_file(empty) == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    data = os.urandom(3 * (1 << 20) + 5)  # more than one read, a ragged end
    path = tmp_path / "f"
    path.write_bytes(data)
    assert hashing.file_digest(path, chunk=1 << 20) == blake3.blake3(data).hexdigest()
    assert hashing.file_digest(path, "sha256", chunk=1 << 20) == hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="unknown digest 'md5'"):
        hashing.new_digest("md5")


def test_a_remembered_digest_serves_only_its_own_algorithm(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    hashing.remember_file_digest(path, "0" * 64)  # (a stand-in: it must not leak to sha256)
    assert hashing.sha256_file(path) == hashlib.sha256(b"abc").hexdigest()
    assert hashing.file_digest(path) == "0" * 64  # taken once...
    assert hashing.file_digest(path) == blake3.blake3(b"abc").hexdigest()  # ...then read


def test_adjacent_ranges_are_read_back_in_one_go(tmp_path, monkeypatch):
    monkeypatch.setattr(_PrefixDigest, "_KEEP_BYTES", 0)  # every piece ahead: a range
    path = tmp_path / "f"
    data = os.urandom(64 * 1000)
    path.write_bytes(data)
    reads = []
    real = os.preadv
    monkeypatch.setattr(
        os, "preadv", lambda fd, buffers, at: reads.append(at) or real(fd, buffers, at)
    )
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = _PrefixDigest(fd, len(data))
        for piece in range(63, -1, -1):  # last piece first: 63 ranges wait for the first
            digest.written(piece * 1000, data[piece * 1000 : (piece + 1) * 1000])
        assert digest.finish() == blake3.blake3(data).hexdigest()
        assert reads == [1000]  # one read of the 63 ranges after the first piece
    finally:
        os.close(fd)
