"""Merge results: one merged model, or task-conditioned (a unified vector plus per-task
modulators), their artifacts on disk (sharded, streamed, lazily loaded), and fast task
switching."""

from mergebench.results.base import (
    ArtifactTarget,
    MergeResult,
    SingleModelResult,
    TaskConditionedResult,
    artifact_bytes,
    load_result,
    sha256_file,
    stream_result,
)
from mergebench.results.shards import DEFAULT_SHARD_BYTES, LazyTensors, parse_size

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "ArtifactTarget",
    "LazyTensors",
    "MergeResult",
    "SingleModelResult",
    "TaskConditionedResult",
    "artifact_bytes",
    "load_result",
    "parse_size",
    "sha256_file",
    "stream_result",
]
