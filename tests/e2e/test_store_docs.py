"""docs/store.md is true: its Python snippets run as written, the files it names exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "store.md"


def test_store_doc_python_snippets_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(DOC), "exec"), namespace)
    store = namespace["store"]
    assert [r["label"] for r in store.runs()] == ["ties"]
    assert (tmp_path / "outputs" / "results.sqlite").is_file()


def test_store_doc_names_files_that_exist():
    named = set(
        re.findall(r"`((?:src/mergebench|scripts|tests|report|bench)/[\w/.]+)`", DOC.read_text())
    )
    assert named
    for path in sorted(named):
        candidates = [ROOT / path, ROOT / "src" / "mergebench" / path]
        assert any(c.exists() for c in candidates), path
