"""The sha256 a `ShardedWriter` computes while tensors come in (`_PrefixDigest`): the file's
own, whatever the order of the writes, handed to `sha256_file` once; never a stale one."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import torch

from mergebench.results.shards import Entry, ShardedWriter, _PrefixDigest
from mergebench.util import hashing

KEYS = {f"k{i}": (i % 5 + 1, 7) for i in range(40)}


def file_sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
        state = hashing._state(path)
        assert hashing._known[state] == file_sha(path)
        assert hashing.sha256_file(path) == file_sha(path)
        assert state not in hashing._known  # used once: the next call reads the file


def test_a_rewritten_piece_spoils_the_digest(tmp_path):
    order = list(KEYS)
    write_model(tmp_path, order, rewrite="k3")
    path = tmp_path / "model.safetensors"
    assert hashing._state(path) not in hashing._known
    assert hashing.sha256_file(path) == file_sha(path)


def test_prefix_digest_waits_for_gaps_and_refuses_incomplete_files(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(100_000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = _PrefixDigest(fd, len(data))
        for start in (90_000, 10_000, 50_000, 0, 30_000, 70_000):  # 20 KB pieces, any order
            digest.written(start, start + (10_000 if start in (0, 90_000) else 20_000))
        assert digest.finish() == hashlib.sha256(data).hexdigest()
        gap = _PrefixDigest(fd, len(data))
        gap.written(0, 50_000)
        gap.written(60_000, 100_000)
        assert gap.finish() is None
        twice = _PrefixDigest(fd, len(data))
        twice.written(50_000, 100_000)
        twice.written(50_000, 100_000)
        twice.written(0, 50_000)
        assert twice.finish() is None
        stopped = _PrefixDigest(fd, len(data))
        stopped.written(0, 10)
        stopped.stop()
    finally:
        os.close(fd)


def test_a_digest_is_forgotten_when_its_file_is_written_again(tmp_path):
    write_model(tmp_path, list(KEYS))
    path = tmp_path / "model.safetensors"
    state = hashing._state(path)
    assert state in hashing._known
    entries = [Entry(k, shape, torch.float32) for k, shape in KEYS.items()]
    ShardedWriter(tmp_path, "model", entries).abort()
    assert state not in hashing._known
    assert hashing._state(path) not in hashing._known
