"""Where a result may be saved, and what a save replaces: the results' policy over
`util.fs.publish_folder` (write beside, swap into place, remove leftovers).

Saving never deletes what this library did not write: a result goes into a missing folder,
an empty one, or one holding an earlier result (recognised by its `result.json`); files of
the earlier result are replaced, anything else in the folder is left alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mergebench.results.artifact import FORMAT, META, file_manifest, meta_checksum, meta_text
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import publish_folder

# Files a version-1 result (no manifest) may hold: the only ones a save may replace there.
V1_FILES = (
    "model.safetensors",
    "task_specific.safetensors",
    "unified.safetensors",
    "masks.safetensors",
    "copied.safetensors",
    "pretrained.safetensors",
    META,
)


def output_dir(directory: str | Path) -> Path:
    """The folder a save publishes into. A symbolic link is followed: the result replaces the
    folder it points at and the link stays (publishing swaps folders by rename, which would
    otherwise replace the link itself and leave the earlier result behind it)."""
    if not str(directory).strip():
        raise MergeBenchError("output folder: empty path")
    path = Path(directory).expanduser()
    if path.is_symlink():
        path = path.resolve()
    if path.name in ("", ".", ".."):  # "." has no name to make sibling temp folders from
        path = Path(os.path.abspath(path))
    if not path.name:
        raise MergeBenchError(f"{directory}: cannot save a result as the file-system root")
    return path


def refuse_inputs_inside(
    directory: Path, inputs: Iterable[Path], reader: str = "this merge"
) -> None:
    """A save replaces the folder's files: it must not take a file this merge reads (the
    pretrained weights of an EMR result saved into the folder that holds them, a result
    saved over the artifact it is read from). Refused before any work."""
    target = directory.resolve()
    for path in inputs:
        resolved = Path(path).resolve()
        if target == resolved or target in resolved.parents:
            raise MergeBenchError(
                f"{directory}: holds {path}, which {reader} reads; saving there would "
                "delete or replace it (choose another output folder)"
            )


def owned_files(directory: Path) -> set[str] | None:
    """Names in `directory` that an earlier save wrote (may be replaced or removed), or None
    for a missing folder. A non-empty folder without our result is an error."""
    if not directory.exists() and not directory.is_symlink():
        return None
    if not directory.is_dir():
        raise MergeBenchError(f"{directory}: exists and is not a folder; refusing to overwrite it")
    entries = {p.name for p in directory.iterdir()}
    if not entries:
        return set()
    refuse = MergeBenchError(
        f"{directory}: not empty and not a mergebench result; refusing to write into it "
        "(choose a new or empty folder)"
    )
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise refuse from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise refuse
    manifest = meta.get("manifest")
    if meta.get("format_version", 1) == 1 and manifest is None:
        return {name for name in V1_FILES if (directory / name).is_file()}
    try:
        listed = {str(name) for name in manifest["files"]}
        if meta.get("checksum") != meta_checksum(meta):
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise MergeBenchError(
            f"{directory / META}: edited since it was saved; refusing to replace the folder's "
            "files (remove them yourself, or choose another folder)"
        ) from None
    return {name for name in listed | {META} if Path(name).name == name and name in entries}


def describe_with_manifest(tmp: Path, describe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`describe()` (which may hash the pretrained weights) and the manifest's hashes, on a
    few threads at once: hashlib and file reads release the GIL, so the passes share the
    cores instead of queueing (they were 40% of a streamed ViT-B/32 EMR merge's wall time)."""
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
        described = pool.submit(describe)
        manifest = file_manifest(tmp, pool)
        meta = dict(described.result())
    meta["manifest"] = manifest
    return meta


def publish_result(
    directory: Path,
    write: Callable[[Path], Callable[[], dict[str, Any]]],
    inputs: Iterable[Path] = (),
) -> Path:
    """Write the result into a marked sibling temp folder, then move it into place
    (`publish_folder`: readers never see half an artifact, the user's files stay).
    `write(tmp)` writes the tensors and returns how to describe them (result.json's content,
    without the manifest); `result.json` lands last. `inputs`: files the result reads, which
    must not lie in `directory`."""
    refuse_inputs_inside(directory, inputs, reader="this result")

    def fill(tmp: Path) -> list[str]:
        meta = describe_with_manifest(tmp, write(tmp))
        meta["checksum"] = meta_checksum(json.loads(meta_text(meta)))
        (tmp / META).write_text(meta_text(meta))
        return sorted(set(meta["manifest"]["files"]) - {META}) + [META]

    return publish_folder(directory, fill, owned_files, what="the result")
