"""docs/store.md is true: the files it names exist (its Python snippets run in
tests/e2e/test_readme.py, with every other doc's)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "store.md"


def test_store_doc_names_files_that_exist():
    named = set(
        re.findall(r"`((?:src/mergebench|scripts|tests|report|bench)/[\w/.]+)`", DOC.read_text())
    )
    assert named
    for path in sorted(named):
        candidates = [ROOT / path, ROOT / "src" / "mergebench" / path]
        assert any(c.exists() for c in candidates), path
