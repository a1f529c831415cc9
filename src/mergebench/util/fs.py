"""Atomic writes: a reader (or a crash) never sees half a file or half a folder.

Temporary files and folders are made beside their target and renamed into place. Python's
`tempfile` creates them private (0600 / 0700) whatever the umask; we give them the
permissions a plain `open()` / `mkdir()` would have, so colleagues on shared storage can
read what mergebench saves when the umask lets them.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path, mode: int) -> None:
    os.chmod(path, mode & ~current_umask())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        _publish(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _publish(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new folder inside `parent` with the permissions `mkdir` would give it."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    _publish(tmp, 0o777)
    return tmp


def publish_tree(root: Path) -> None:
    """Give every file and folder under `root` the umask's permissions (files written by
    libraries through temp files may be private)."""
    mask = current_umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o666 & ~mask)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- marked temporary folders (cleaned up after a killed process) ---------------------------
TEMP_MARKER = ".mergebench-temp"  # a file inside every temporary folder we create: "pid host"


def make_marked_temp_dir(parent: Path, prefix: str) -> Path:
    """`make_temp_dir` plus our marker file (owner PID and host), so that a later run can
    recognise the folder as ours, and left behind by a process that no longer exists."""
    tmp = make_temp_dir(parent, prefix)
    (tmp / TEMP_MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _is_stale(folder: Path) -> bool:
    """True only for a folder holding our marker whose owner is certainly gone: its PID is
    dead on this host (folders of other hosts are never touched)."""
    marker = folder / TEMP_MARKER
    try:
        if folder.is_symlink() or not folder.is_dir() or not marker.is_file():
            return False
        pid_text, host = marker.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False  # another machine's save on shared storage: it may still be running
    if pid == os.getpid():
        return False
    return not _pid_alive(pid)


def remove_stale_temp_dirs(parent: Path, name: str) -> list[Path]:
    """Remove `.<name>.tmp-*` / `.<name>.old-*` folders in `parent` left by a killed save:
    only those with our marker inside whose owner process is dead. Returns what went."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(f".{name}.tmp-") or entry.name.startswith(f".{name}.old-")):
            continue
        if _is_stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
