"""A throwaway PostgreSQL server for the store tests, started by the test suite itself.

`postgres_server` (session): `initdb` into a fresh temporary folder, `pg_ctl start` on a free
port (127.0.0.1) with its Unix socket in that folder, `pg_ctl stop` at the end. As root the
server runs as the `postgres` user (PostgreSQL refuses to run as root). `postgres_url`
(function): a new empty database on that server, as a `postgresql://` URL.

Test modules use it with `pytest_plugins = ["conftest_postgres"]` (one server per session).
Tests skip, with the reason, only where no server binaries exist (Debian: apt-get install
postgresql; or set MERGEBENCH_PG_BIN to the folder holding initdb and pg_ctl).
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_DB_COUNTER = itertools.count()


def pg_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: $MERGEBENCH_PG_BIN, PATH, or Debian's
    /usr/lib/postgresql/<version>/bin (the newest)."""
    candidates: list[Path] = []
    if os.environ.get("MERGEBENCH_PG_BIN"):
        candidates.append(Path(os.environ["MERGEBENCH_PG_BIN"]))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: _version_key(p.parent.name), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in name.split(".") if x.isdigit())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: Path, root: Path, as_user: list[str]) -> None:
        self.bindir, self.root, self.as_user = bindir, root, as_user
        self.data, self.sock, self.log = root / "data", root / "sock", root / "server.log"
        self.port = 0
        self.user = "mergebench"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.as_user, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )

    def start(self) -> None:
        out = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.stderr.strip() or out.stdout.strip()}")
        last = ""
        for _ in range(3):  # the free port may be taken between choosing and binding
            self.port = _free_port()
            opts = (
                f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=100"
            )
            out = self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                opts,
                "-w",
                "-t",
                "90",
                "start",
            )
            if out.returncode == 0:
                return
            last = out.stderr.strip() or out.stdout.strip()
            if self.log.is_file():
                last += " | " + self.log.read_text(errors="replace")[-500:]
        raise RuntimeError(f"pg_ctl start failed: {last}")

    def stop(self) -> None:
        # immediate: a throwaway server needs no shutdown checkpoint
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
        )

    def url(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, dbname: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    pytest.importorskip("psycopg", reason="psycopg missing: pip install -e '.[postgres]'")
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install "
            "postgresql, or set MERGEBENCH_PG_BIN"
        )
    # Not under pytest's tmp folder: as root that is private (0700) to root, and the server
    # runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="mergebench-pg-"))
    (root / "sock").mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root and there is no postgres user to run the server as")
        for path in (root, root / "sock"):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root and runuser (util-linux) is missing")
        as_user = [runuser, "-u", "postgres", "--"]
    server = PostgresServer(bindir, root, as_user)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database(f"mb_test_{os.getpid()}_{next(_DB_COUNTER)}")
