"""The leaderboard over several stores (SQLite files, a PostgreSQL server) and on bad input:
empty files, other applications' databases, read-only mounts, a family that is not stored."""

from __future__ import annotations

import json
import sqlite3

import pytest

from mergebench.cli.leaderboard import main
from mergebench.report.boards import load_boards
from mergebench.report.records import RunRecord, TaskScore
from mergebench.report.store import SQLiteStore, open_store

pytest_plugins = ["conftest_postgres"]  # the postgres_url fixture


def record(label: str, values, family: str = "tiny", **config) -> RunRecord:
    return RunRecord(
        method=label,
        label=label,
        family=family,
        taskset="two",
        config={"method": {"name": label, **config}, "model": family},
        scores=[TaskScore(t, "accuracy", v) for t, v in zip("ab", values, strict=True)],
    )


def set_created_at(path, label: str, when: str) -> None:
    con = sqlite3.connect(path)
    con.execute("UPDATE runs SET created_at = ? WHERE label = ?", (when, label))
    con.commit()
    con.close()


@pytest.fixture
def two_dbs(tmp_path):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    sa, sb = SQLiteStore(a), SQLiteStore(b)
    sa.add_run(record("individual", [0.8, 0.6]))
    sa.add_run(record("ties", [0.4, 0.4]))
    sb.add_run(record("emr", [0.7, 0.5]))
    sb.add_run(record("ties", [0.5, 0.5]))  # the same config (hash) as in a
    sb.add_run(record("emr", [0.6, 0.6], family="other"))
    return a, b


def test_union_counts_a_hash_once_and_the_latest_wins(two_dbs) -> None:
    a, b = two_dbs
    set_created_at(a, "ties", "2030-01-01T00:00:00+00:00")  # a's ties is the newer one
    (board,) = load_boards([a, b], family="tiny")
    assert [r.label for r in board.rows] == ["individual", "emr", "ties"]
    assert board.row("ties").scores == {"a": 0.4, "b": 0.4}
    assert board.row("emr").normalized["a"] == pytest.approx(0.7 / 0.8)  # across stores

    set_created_at(b, "ties", "2031-01-01T00:00:00+00:00")
    assert load_boards([a, b], family="tiny")[0].row("ties").scores == {"a": 0.5, "b": 0.5}
    # one store alone is what it was before
    assert load_boards(a, family="tiny")[0].row("ties").scores == {"a": 0.4, "b": 0.4}


def test_all_runs_across_stores(two_dbs) -> None:
    a, b = two_dbs
    SQLiteStore(a).add_run(record("ties", [0.1, 0.1], k=0.2))  # another config, same label
    (board,) = load_boards([a, b], family="tiny", all_runs=True)
    assert sorted(r.label for r in board.rows if r.method == "ties") == [
        "ties (method.k=-)",
        "ties (method.k=0.2)",
    ]


def test_cli_repeated_db_and_store(two_dbs, capsys) -> None:
    a, b = two_dbs
    assert main(["--db", str(a), "--store", f"sqlite:///{b}", "--format", "json"]) == 0
    boards = json.loads(capsys.readouterr().out)["boards"]
    assert sorted(x["family"] for x in boards) == ["other", "tiny"]
    tiny = next(x for x in boards if x["family"] == "tiny")
    assert sorted(r["label"] for r in tiny["rows"]) == ["emr", "individual", "ties"]


def test_cli_combines_sqlite_and_postgres(two_dbs, postgres_url, capsys) -> None:
    a, _ = two_dbs
    pg = open_store(postgres_url)
    pg.add_run(record("task_arithmetic", [0.3, 0.3]))
    pg.add_run(record("ties", [0.9, 0.9]))  # same hash as a's ties; written now: newer
    set_created_at(a, "ties", "2000-01-01T00:00:00+00:00")
    assert main(["--db", str(a), "--store", postgres_url, "--format", "json"]) == 0
    (tiny,) = json.loads(capsys.readouterr().out)["boards"]
    rows = {r["label"]: r for r in tiny["rows"]}
    assert set(rows) == {"individual", "ties", "task_arithmetic"}
    assert rows["ties"]["average"] == pytest.approx(0.9)
    # reading the PostgreSQL store alone, and an empty database is not a results store
    assert main(["--store", postgres_url, "--family", "tiny"]) == 0
    capsys.readouterr()


def test_cli_unknown_family_lists_the_stored_ones(two_dbs, capsys) -> None:
    a, b = two_dbs
    assert main(["--db", str(a), "--db", str(b), "--family", "minlm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'minlm'" in err and "families stored: other, tiny" in err
    assert main(["--db", str(a), "--family", "tiny", "--taskset", "eight"]) == 2
    assert "task sets stored for tiny: two" in capsys.readouterr().err
    # an empty results database is not a typo: an empty leaderboard, exit 0
    empty = a.parent / "empty.sqlite"
    SQLiteStore(empty)
    assert main(["--db", str(empty), "--family", "tiny", "--format", "markdown"]) == 0
    assert "No results stored yet." in capsys.readouterr().out


def test_cli_zero_byte_file(tmp_path, capsys) -> None:
    path = tmp_path / "zero.sqlite"
    path.touch()
    assert main(["--db", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mergebench-leaderboard: error: {path}: not a mergebench results database " \
        "(empty file)"  # fmt: skip
    assert path.stat().st_size == 0


def test_cli_other_applications_database(tmp_path, capsys) -> None:
    path = tmp_path / "browser.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE history (url TEXT)")
    con.commit()
    con.close()
    before = path.read_bytes()
    assert main(["--db", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a mergebench results database" in err
    assert path.read_bytes() == before
    con = sqlite3.connect(path)
    names = [r[0] for r in con.execute("SELECT name FROM sqlite_master")]
    con.close()
    assert names == ["history"]


def test_cli_reads_a_read_only_mount(two_dbs) -> None:
    from test_store import _readonly_mount_run

    a, _ = two_dbs
    code = (
        "from mergebench.cli.leaderboard import main\n"
        f"raise SystemExit(main(['--db', {str(a)!r}, '--format', 'markdown']))\n"
    )
    out = _readonly_mount_run(a.parent, code)
    assert out.returncode == 0, out.stderr
    assert "## tiny / two (2 tasks)" in out.stdout and "ties" in out.stdout


def test_cli_bad_url_is_exit_2(capsys) -> None:
    assert main(["--store", "mysql://x@y/z"]) == 2
    assert "unknown scheme mysql://" in capsys.readouterr().err
