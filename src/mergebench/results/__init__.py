"""Merge results: one merged model, or task-conditioned (a unified vector plus per-task
modulators), their artifacts on disk (sharded, streamed, lazily loaded), and fast task
switching.

Modules by job: `kinds` (the result kinds), `artifact` (the format: result.json, manifest,
checksum, versions), `loading` (`load_result` and its checks), `publish` (where a save may
write, over `util.fs.publish_folder`), `streaming` (merges that write as they go), `shards`
(safetensors shards), `switching` (fast task switching)."""

from mergebench.results.artifact import artifact_bytes
from mergebench.results.kinds import MergeResult, SingleModelResult, TaskConditionedResult
from mergebench.results.loading import load_result
from mergebench.results.shards import DEFAULT_SHARD_BYTES, LazyTensors, parse_size
from mergebench.results.streaming import ArtifactTarget, stream_result
from mergebench.util.hashing import file_digest, sha256_file

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "ArtifactTarget",
    "LazyTensors",
    "MergeResult",
    "SingleModelResult",
    "TaskConditionedResult",
    "artifact_bytes",
    "file_digest",
    "load_result",
    "parse_size",
    "sha256_file",
    "stream_result",
]
