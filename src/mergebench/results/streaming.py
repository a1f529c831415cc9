"""Streamed merges: a merge writes its outputs straight into the artifact being built (a
temp folder beside the destination) as keys finish, instead of holding them for `save`."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergebench.results.kinds import MergeResult
from mergebench.results.loading import load_result
from mergebench.results.publish import output_dir, publish_result, refuse_inputs_inside
from mergebench.results.shards import (
    DEFAULT_SHARD_BYTES,
    Entry,
    LazyTensors,
    ShardedWriter,
    open_stem,
    parse_size,
)
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import make_marked_temp_dir


class ArtifactTarget:
    """Where a streamed merge writes its parts: the result's temp folder, being built."""

    def __init__(self, folder: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.done: set[str] = set()

    def writer(
        self, stem: str, entries: list[Entry], metadata: Mapping[str, str] | None = None
    ) -> ShardedWriter:
        if stem in self.done:
            raise MergeBenchError(f"result part {stem!r} written twice")
        self.done.add(stem)
        return ShardedWriter(self.folder, stem, entries, self.shard_bytes, metadata)

    def tensors(self, stem: str) -> LazyTensors:
        """A finished part, read back lazily."""
        return LazyTensors(open_stem(self.folder, stem))

    @contextmanager
    def scratch(self) -> Iterator[ArtifactTarget]:
        """A temporary target beside this one for an intermediate model (M&R's base merge),
        removed afterwards; a killed process leaves a marked folder the next save removes."""
        folder = make_marked_temp_dir(self.folder.parent, f"{self.folder.name}.scratch-")
        try:
            yield ArtifactTarget(folder, self.shard_bytes)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def stream_result(
    directory: str | Path,
    merge: Callable[[ArtifactTarget], MergeResult],
    shard_size: int | str = DEFAULT_SHARD_BYTES,
    inputs: Iterable[Path] = (),
) -> MergeResult:
    """Run `merge(target)` writing into a temp folder beside `directory`, complete the parts
    it did not stream, publish the folder atomically, and load it back lazily. `inputs`: the
    merge's checkpoint files, refused up front if they lie in `directory`."""
    shard_bytes = parse_size(shard_size)
    folder = output_dir(directory)
    refuse_inputs_inside(folder, inputs)

    def write(tmp: Path) -> Callable[[], dict[str, Any]]:
        target = ArtifactTarget(tmp, shard_bytes)
        result = merge(target)
        result.write_tensors(tmp, shard_bytes, done=target.done)
        return result.describe

    out = publish_result(folder, write)
    return load_result(out, verify=False)
