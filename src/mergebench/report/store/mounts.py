"""Is a path on a network file system? SQLite's WAL needs memory shared between writers, which
NFS, Lustre, CIFS and the like do not give across machines, so the SQLite store refuses to
write there (see `SQLiteStore`). The mount holding a path is looked up in
/proc/self/mountinfo; outside Linux nothing is detected.
"""

from __future__ import annotations

import os
from pathlib import Path

# File systems on which SQLite's WAL (shared memory between writers) and often its POSIX
# locks do not work across machines. FUSE file systems appear as `fuse.<name>`.
NETWORK_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb2",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "glusterfs",
        "gfs2",
        "ocfs2",
        "panfs",
        "wekafs",
        "orangefs",
        "pvfs2",
        "quobyte",
        "davfs",
    }
)
NETWORK_FUSE = frozenset(
    {
        "sshfs",
        "ceph",
        "cephfs",
        "glusterfs",
        "beegfs",
        "s3fs",
        "gcsfuse",
        "rclone",
        "juicefs",
        "lizardfs",
        "moosefs",
        "mfs",
        "seaweedfs",
        "davfs",
        "quobyte",
    }
)
_MOUNTINFO = Path("/proc/self/mountinfo")


def is_network_fs(fstype: str) -> bool:
    fstype = fstype.lower()
    if fstype.startswith("fuse."):
        return fstype[len("fuse.") :] in NETWORK_FUSE
    return fstype in NETWORK_FS


def _unescape_mount(field: str) -> str:
    """Mount points in mountinfo escape space, tab, newline and backslash as octal `\\NNN`."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, file system type) per line of /proc/<pid>/mountinfo, in mount order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or sep + 1 >= len(fields):
            continue
        mounts.append((_unescape_mount(fields[4]), fields[sep + 1]))
    return mounts


def network_fs_type(path: str | os.PathLike[str], mountinfo: str | None = None) -> str | None:
    """The file system type of the mount holding `path` if it is a network file system
    (nfs, cifs, lustre, gpfs, beegfs, ceph, fuse.sshfs...), else None.

    Reads /proc/self/mountinfo (or the `mountinfo` text given, for tests); where there is no
    such file (not Linux) it cannot tell and returns None. `path` need not exist yet: its
    nearest existing folder decides.
    """
    if mountinfo is None:
        try:
            mountinfo = _MOUNTINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    # Symbolic links are followed in the part of the path that exists; the rest (folders
    # the store would create) lies on the same mount.
    existing, rest = Path(os.path.abspath(path)), []
    while not existing.exists() and existing.parent != existing:
        rest.append(existing.name)
        existing = existing.parent
    resolved = str(existing.resolve().joinpath(*reversed(rest)))
    best: tuple[str, str] | None = None
    for mount_point, fstype in parse_mountinfo(mountinfo):
        base = mount_point.rstrip("/")
        inside = resolved == mount_point or resolved.startswith(base + "/") or mount_point == "/"
        # a later mount on the same point hides an earlier one, hence >=
        if inside and (best is None or len(mount_point) >= len(best[0])):
            best = (mount_point, fstype)
    if best is not None and is_network_fs(best[1]):
        return best[1]
    return None
