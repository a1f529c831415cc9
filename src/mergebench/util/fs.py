"""Atomic writes: a reader (or a crash) never sees half a file or half a folder.

Temporary files and folders are made beside their target and renamed into place: one file
(`atomic_file`, `atomic_write_bytes`, `atomic_save_safetensors`) or a whole folder
(`publish_folder`, whose temp folders carry a marker so a later run can remove those a killed
process left). Python's
`tempfile` creates them private (0600 / 0700) whatever the umask; we give them the
permissions a plain `open()` / `mkdir()` would have, so colleagues on shared storage can
read what mergebench saves when the umask lets them.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergebench.util.errors import MergeBenchError


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


def atomic_save_safetensors(
    path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> Path:
    """`tensors` (contiguous torch tensors) as a safetensors file at `path`, through
    `atomic_file`: a crash never leaves half a checkpoint or cache entry behind."""
    from safetensors.torch import save_file

    plain = dict(tensors)
    return atomic_file(path, lambda tmp: save_file(plain, str(tmp), metadata=dict(metadata or {})))


def file_in_the_way(path: str | Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is a file, not a folder (writing
    `path` then fails with a misleading "File exists" or "Not a directory"); else None."""
    for ancestor in Path(path).parents:
        if ancestor.exists():
            return None if ancestor.is_dir() else ancestor
    return None


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


# --- publishing a folder atomically -----------------------------------------------------------
def publish_folder(
    directory: Path,
    fill: Callable[[Path], list[str]],
    owned_files: Callable[[Path], set[str] | None],
    what: str = "the folder",
) -> Path:
    """Build a folder beside `directory` and move it into place: readers never see half of it.

    `fill(tmp)` writes the new files into a marked temp folder beside `directory` and returns
    their names, the one that marks the folder complete last. `owned_files(directory)` is the
    caller's policy: the names an earlier publication wrote there (which may be replaced or
    removed), None for a missing folder; it raises to refuse a folder it does not recognise.
    Then:
    - a missing folder: the temp folder is renamed into place;
    - a folder holding only owned files (and not the working directory): swapped whole;
    - an empty folder, or one holding other files too (the user's notes): the new files are
      moved in one by one in `fill`'s order, then the owned files not written again are
      removed; replacing a file that is not owned is refused.
    Temp folders of a killed earlier publication are removed first; on any failure the temp
    folder goes and `directory` is as it was. OS errors are a `MergeBenchError`
    "<directory>: cannot save <what> (<reason>)"."""
    try:
        old_files = owned_files(directory)
        parent = directory.parent
        blocker = file_in_the_way(directory)
        if blocker is not None:
            raise MergeBenchError(
                f"{directory}: cannot save {what} ({blocker} is a file, not a folder)"
            )
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(parent, directory.name)
        tmp = make_marked_temp_dir(parent, f".{directory.name}.tmp-")
    except OSError as err:
        raise _save_error(directory, what, err) from None
    try:
        order = fill(tmp)
        publish_tree(tmp)  # libraries write private (0600) files: give them the umask's
        entries = set() if old_files is None else {p.name for p in directory.iterdir()}
        new_files = set(order)
        clash = sorted((new_files & entries) - old_files) if old_files is not None else []
        if clash:
            raise MergeBenchError(
                f"{directory / clash[0]}: not written by mergebench; refusing to overwrite it"
            )
        # From the first rename to the last removal, Ctrl-C waits: an interrupt there used
        # to report "interrupted" over a folder already replaced, leaving `.old-*` behind.
        with interrupts_deferred(f"{directory}: saved in full before the interrupt"):
            if old_files is None:
                (tmp / TEMP_MARKER).unlink()
                os.replace(tmp, directory)
            elif entries and entries <= old_files and not _holds_cwd(directory):
                old = make_marked_temp_dir(parent, f".{directory.name}.old-")
                os.replace(directory, old / "x")
                (tmp / TEMP_MARKER).unlink()
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                for name in order:
                    os.replace(tmp / name, directory / name)
                for name in sorted(old_files - new_files):
                    (directory / name).unlink(missing_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(directory, what, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


@contextmanager
def interrupts_deferred(done: str = "") -> Iterator[None]:
    """Hold SIGINT until the block ends (main thread only: signals go there), then raise
    `KeyboardInterrupt(done)`, which says what state the interrupted work is in. Also for
    code during which a Ctrl-C would be lost: raised inside a ctypes callback (numba's
    compiler), Python prints and drops it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt(done)


def _holds_cwd(directory: Path) -> bool:
    """Whether the process works inside `directory` (swapping it would strand the process)."""
    try:
        cwd = Path.cwd().resolve()
        return cwd == directory.resolve() or directory.resolve() in cwd.parents
    except OSError:
        return True


def _save_error(directory: Path, what: str, err: OSError) -> MergeBenchError:
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif err.errno == errno.EROFS:
        reason = "read-only file system"
    return MergeBenchError(f"{directory}: cannot save {what} ({reason})")
