"""Network file system detection: SQLite's WAL is refused on NFS, Lustre, CIFS, sshfs...
(fake /proc/self/mountinfo texts, so no such mount is needed)."""

from __future__ import annotations

import sqlite3

import pytest

from mergebench.report.store import (
    SQLiteStore,
    is_network_fs,
    network_fs_type,
    parse_mountinfo,
)
from mergebench.util.errors import MergeBenchError

MOUNTINFO = """\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 0:26 / /proc rw,nosuid shared:5 - proc proc rw
41 22 0:40 / /shared rw,relatime shared:20 - nfs4 fs1:/export/shared rw,vers=4.2
42 41 253:2 / /shared/local rw,relatime shared:21 - xfs /dev/vdb rw
43 22 0:41 / /scratch rw,relatime shared:22 - lustre 10.0.0.1@o2ib:/scratch rw,flock
44 22 0:42 / /home/me/remote rw,nosuid shared:23 - fuse.sshfs me@host:/data rw
45 22 0:43 / /mnt/team\\040drive rw shared:24 - cifs //srv/team rw
46 22 0:44 / /gpfs rw shared:25 - gpfs gpfs0 rw
47 22 0:45 / /tmp rw,nosuid shared:26 - tmpfs tmpfs rw
48 22 0:46 / /home/me/local-fuse rw shared:27 - fuse.portal portal rw
49 22 0:47 / /beegfs rw shared:28 - beegfs beegfs_nodev rw
"""


def test_parse_mountinfo_unescapes_mount_points() -> None:
    mounts = dict(parse_mountinfo(MOUNTINFO))
    assert mounts["/mnt/team drive"] == "cifs"
    assert mounts["/shared"] == "nfs4" and mounts["/"] == "ext4"
    assert parse_mountinfo("garbage line\n\n") == []


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/shared/results.sqlite", "nfs4"),
        ("/shared/deep/not/yet/created/results.sqlite", "nfs4"),
        ("/shared/local/results.sqlite", None),  # a local disk mounted inside the NFS tree
        ("/sharedother/results.sqlite", None),  # a prefix of the name is not the mount
        ("/scratch/u/r.sqlite", "lustre"),
        ("/home/me/remote/r.sqlite", "fuse.sshfs"),
        ("/mnt/team drive/r.sqlite", "cifs"),
        ("/gpfs/r.sqlite", "gpfs"),
        ("/beegfs/r.sqlite", "beegfs"),
        ("/tmp/r.sqlite", None),
        ("/home/me/local-fuse/r.sqlite", None),
        ("/home/me/r.sqlite", None),
    ],
)
def test_network_fs_type(path, fstype) -> None:
    assert network_fs_type(path, MOUNTINFO) == fstype


def test_later_mount_on_the_same_point_wins() -> None:
    text = MOUNTINFO + "50 22 0:48 / /shared rw shared:29 - ext4 /dev/vdc rw\n"
    assert network_fs_type("/shared/r.sqlite", text) is None


def test_fs_type_names() -> None:
    for name in ("nfs", "NFS4", "smb3", "ceph", "fuse.ceph", "fuse.gcsfuse", "glusterfs"):
        assert is_network_fs(name), name
    for name in ("ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "fuse.portal"):
        assert not is_network_fs(name), name


def test_this_machine_is_readable() -> None:
    # the real /proc/self/mountinfo parses (wherever there is one) and gives a type or None
    assert network_fs_type(".") in (None, *[t for _, t in parse_mountinfo(_real())])


def _real() -> str:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _fake_nfs(folder) -> str:
    """A mountinfo text in which `folder` is an NFS mount."""
    return MOUNTINFO + f"60 22 0:50 / {folder} rw shared:30 - nfs fs1:/export rw\n"


def test_sqlite_on_a_network_fs_is_refused_in_one_line(tmp_path) -> None:
    path = tmp_path / "r.sqlite"
    with pytest.raises(MergeBenchError) as err:
        SQLiteStore(path, mountinfo=_fake_nfs(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "network file system (nfs)" in message
    assert "store.url=postgresql://" in message and "store.allow_network_fs=true" in message
    assert not path.exists()  # nothing was created


def test_allow_network_fs_uses_the_rollback_journal(tmp_path) -> None:
    path = tmp_path / "r.sqlite"
    store = SQLiteStore(path, allow_network_fs=True, mountinfo=_fake_nfs(tmp_path))
    assert store.journal_mode == "DELETE" and store.runs() == []
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()
    # reading (the leaderboard) never needs the flag and changes nothing
    assert SQLiteStore(path, readonly=True).runs() == []


def test_local_disk_keeps_wal(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "r.sqlite", mountinfo=MOUNTINFO)  # /tmp... is not in it
    assert store.journal_mode == "WAL"
