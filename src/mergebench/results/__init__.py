"""Merge results: one merged model, or task-conditioned (a unified vector plus per-task
modulators), their artifacts on disk, and fast task switching."""

from mergebench.results.base import (
    MergeResult,
    SingleModelResult,
    TaskConditionedResult,
    artifact_bytes,
    load_result,
    sha256_file,
)

__all__ = [
    "MergeResult",
    "SingleModelResult",
    "TaskConditionedResult",
    "artifact_bytes",
    "load_result",
    "sha256_file",
]
