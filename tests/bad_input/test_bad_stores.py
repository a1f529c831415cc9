"""The runs store given bad input: a password never shown, reading never leaves files behind."""

from __future__ import annotations

import json
import sqlite3

import pytest

from bad_input.conftest import Outcome, assert_one_line_error
from mergebench.cli.leaderboard import main as leaderboard_main
from mergebench.report.records import RunRecord, TaskScore
from mergebench.report.store import SQLiteStore

SECRET = "s3cretpw"


def leaderboard(capsys, *args: str) -> Outcome:
    capsys.readouterr()
    code = leaderboard_main(list(args))
    return Outcome(code, capsys.readouterr().err)


def record(config: dict | None = None) -> RunRecord:
    return RunRecord(
        method="ties",
        label="ties",
        family="tiny",
        taskset="two",
        config=config or {"method": {"name": "ties"}},
        scores=[TaskScore("a", "accuracy", 0.5)],
    )


# --- issue 26.5: a store URL's password is never shown ------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://me:{SECRET}@[::1/db",  # urlsplit cannot parse it; libpq echoes it
        f"postgresql://me:{SECRET[:3]} {SECRET[3:]}@127.0.0.1:1/db",  # libpq echoes the password
        f"postgresql://127.0.0.1:1/db?password={SECRET}",  # a password as a URL parameter
        f"postgresql://me:{SECRET}@127.0.0.1:notaport/db",
    ],
)
def test_store_url_password_is_never_shown(capsys, url):
    pytest.importorskip("psycopg")
    outcome = leaderboard(capsys, "--store", url)
    line = assert_one_line_error(outcome, "mergebench-leaderboard: error: store ")
    assert SECRET not in line and SECRET[:3] + " " not in line and "***" in line


def test_libpq_string_given_as_db_hides_its_password(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcome = leaderboard(capsys, "--db", f"host=db password={SECRET}")
    line = assert_one_line_error(outcome, "no results database there")
    assert SECRET not in line


def test_stored_config_hides_the_store_password(tmp_path):
    url = f"postgresql://me:{SECRET}@db:5432/x"
    db = tmp_path / "r.sqlite"
    SQLiteStore(db).add_run(record({"method": {"name": "ties"}, "store": {"url": url}}))
    con = sqlite3.connect(db)
    (config_json,) = con.execute("SELECT config_json FROM runs").fetchone()
    con.close()
    assert SECRET not in config_json
    assert json.loads(config_json)["store"]["url"] == "postgresql://me:***@db:5432/x"


def test_wandb_config_hides_the_store_password(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb_reader import read_offline_run

    from mergebench.report.wandb import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    url = f"postgresql://me:{SECRET}@db:5432/x"
    WandbLogger(dir=tmp_path).log_run(record({"store": {"url": url}}))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert run.config["store"]["url"] == "postgresql://me:***@db:5432/x"
    assert not [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


# --- issue 26.6: reading a store leaves nothing beside it -----------------------------------------
def written_store(tmp_path):
    db = tmp_path / "r.sqlite"
    SQLiteStore(db).add_run(record())  # WAL mode, as every store mergebench writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.sqlite"]
    return db


def test_leaderboard_leaves_no_wal_or_shm_files(tmp_path, capsys):
    db = written_store(tmp_path)
    before = db.read_bytes()
    assert leaderboard(capsys, "--db", str(db)).code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.sqlite"]
    assert db.read_bytes() == before


def test_leaderboard_on_a_truncated_store_leaves_nothing(tmp_path, capsys):
    db = written_store(tmp_path)
    db.write_bytes(db.read_bytes()[:5000])
    line = assert_one_line_error(leaderboard(capsys, "--db", str(db)), "r.sqlite")
    assert "malformed" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.sqlite"]


def test_leaderboard_on_a_corrupt_store_leaves_nothing(tmp_path, capsys):
    db = written_store(tmp_path)
    data = bytearray(db.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # the first table page overwritten
    db.write_bytes(bytes(data))
    assert_one_line_error(leaderboard(capsys, "--db", str(db)), "r.sqlite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.sqlite"]


# --- round 3: where the leaderboard writes -----------------------------------------------------
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--out", "{tmp}/folder"], "--out {tmp}/folder: is a folder; give the file to write"),
        (["--out", "{tmp}/afile/x.md"], "cannot write ({tmp}/afile is a file, not a folder)"),
        (["--plots", "{tmp}/afile/plots"], "--plots {tmp}/afile/plots: cannot write"),
        (["--out", "/proc/mergebench-x.md"], "--out /proc/mergebench-x.md: cannot write"),
    ],
    ids=["out-a-folder", "out-below-a-file", "plots-below-a-file", "out-unwritable"],
)
def test_leaderboard_output_that_cannot_be_written(tmp_path, capsys, args, says):
    # Before: IsADirectoryError / FileExistsError / NotADirectoryError tracebacks.
    from mergebench.cli.leaderboard import main
    from mergebench.report.records import RunRecord, TaskScore
    from mergebench.report.store import SQLiteStore

    db = tmp_path / "r.sqlite"
    SQLiteStore(db).add_run(
        RunRecord(method="ties", label="ties", family="f", taskset="t",
                  config={"method": {"name": "ties"}, "taskset": {"name": "t", "tasks": ["a"]}},
                  scores=[TaskScore("a", "accuracy", 0.5)])
    )  # fmt: skip
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("mine")
    args = [a.format(tmp=tmp_path) for a in args]
    capsys.readouterr()
    assert main(["--db", str(db), "--format", "markdown", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and says.format(tmp=tmp_path) in lines[0], lines
    assert (tmp_path / "afile").read_text() == "mine" and not list((tmp_path / "folder").iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
