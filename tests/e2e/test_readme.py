"""Every ```python block of README.md and docs/*.md runs as written, in a folder holding
the small local checkpoints the blocks name; the README's shell walk-through runs too.

A block that needs what a test cannot have (a hub model, a data set, a GPU) is marked
`<!-- no-test: reason -->` on the line before it: it is still compiled and its imports are
run, so a wrong module or name fails here. Some blocks have their own checks (`CHECKS`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?:^<!--\s*no-test:(?P<reason>.*?)-->[ \t]*\n)?^(?P<indent>[ \t]*)```python[ \t]*\n"
    r"(?P<code>.*?)^(?P=indent)```",
    flags=re.S | re.M,
)


class Block:
    def __init__(self, path: Path, index: int, line: int, code: str, reason: str | None):
        self.path, self.index, self.line, self.code = path, index, line, code
        self.reason = reason.strip() if reason is not None else None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}#{self.index}"

    def compiled(self) -> Any:
        # Line numbers in a traceback are the markdown file's.
        return compile("\n" * self.line + self.code, str(self.path), "exec")


def python_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for index, match in enumerate(BLOCK.finditer(text)):
        indent = match["indent"]
        code = "".join(line[len(indent) :] for line in match["code"].splitlines(keepends=True))
        line = text.count("\n", 0, match.start("code"))
        blocks.append(Block(path, index, line, code, match["reason"]))
    return blocks


ALL_BLOCKS = [block for path in DOCS for block in python_blocks(path)]
# The blocks that cannot run here, and why (keep it short: each reason real).
NOT_RUN = {"docs/paper-settings.md#0"}


def test_the_docs_have_python_blocks_and_few_are_not_run():
    ids = {block.id for block in ALL_BLOCKS}
    assert {"README.md#0", "docs/store.md#0"} <= ids
    skipped = {block.id: block.reason for block in ALL_BLOCKS if block.reason is not None}
    assert set(skipped) == NOT_RUN, skipped
    assert all(len(reason) > 10 for reason in skipped.values()), skipped


def write_checkpoints(folder: Path, tiny_models) -> None:
    """What the blocks name: `pre.safetensors`, `a.safetensors`, `b_dir/` (an HF folder)."""
    pre, finetuned = tiny_models
    save_file(pre, folder / "pre.safetensors")
    save_file(finetuned["a"], folder / "a.safetensors")
    (folder / "b_dir").mkdir()
    save_file(finetuned["b"], folder / "b_dir" / "model.safetensors")


def check_readme_api(folder: Path, namespace: dict) -> None:
    r, r2, r3 = namespace["r"], namespace["r2"], namespace["r3"]
    assert r.tasks == ["a", "b"]
    for task in r.tasks:
        for key, value in r.state_dict(task).items():
            assert (r2.state_dict(task)[key] == value).all(), key
            assert (r3.state_dict(task)[key] == value).all(), key
    assert (folder / "out_streamed" / "unified.safetensors.index.json").exists()
    assert (folder / "out" / "masks.safetensors").exists()


def check_store_doc(folder: Path, namespace: dict) -> None:
    store = namespace["store"]
    assert [r["label"] for r in store.runs()] == ["ties"]
    assert (folder / "outputs" / "results.sqlite").is_file()


CHECKS: dict[str, Callable[[Path, dict], None]] = {
    "README.md#0": check_readme_api,
    "docs/store.md#0": check_store_doc,
}


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.id)
def test_python_block_runs(block, tmp_path, tiny_models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_block__"}
    if block.reason is not None:  # not run: its imports must still resolve
        tree = ast.parse(block.code)
        imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        assert imports or block.code.strip(), block.id
        exec(compile(ast.Module(body=imports, type_ignores=[]), str(block.path), "exec"), namespace)
        return
    write_checkpoints(tmp_path, tiny_models)
    exec(block.compiled(), namespace)
    if block.id in CHECKS:
        CHECKS[block.id](tmp_path, namespace)


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def commands(block: str) -> list[list[str]]:
    """The command lines of a bash block (continuations joined, comments dropped)."""
    import shlex

    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def test_readme_own_models_section_runs(tmp_path, monkeypatch, capsys):
    """ "Your own models": from two fine-tunes made here (tests/tiny_hf.py) to a board row and
    a saved merge, running the section's commands as written, in its folder."""
    import tiny_hf

    from mergebench.bench import job as bench
    from mergebench.cli import leaderboard
    from mergebench.util.config import compose_config

    tiny_hf.make_own_world(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    block = re.findall(r"```bash\n(.*?)```", section("Your own models"), flags=re.S)[0]
    lines = commands(block)
    assert [argv[0] for argv in lines] == [
        "mergebench", "mergebench-leaderboard", "mergebench-export"
    ]  # fmt: skip
    overrides = [*lines[0][1:], "progress=false", f"taskset.cache_dir={tmp_path / 'hf'}"]
    summary = bench.run(compose_config(overrides), overrides)
    assert [s["task"] for s in summary["scores"]] == ["sentiment", "topic"]
    assert (tmp_path / "outputs" / "merged_ties").is_dir()
    capsys.readouterr()
    assert leaderboard.main(lines[1][1:]) == 0
    board = capsys.readouterr().out
    for row in ("individual", "pretrained", "ties"):
        assert f"| {row} " in board, board

    from transformers import AutoModelForSequenceClassification

    from mergebench.cli import export
    from mergebench.results import load_result

    export.main(lines[2][1:])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf/ties-sentiment")
    assert model.config.id2label == {0: "negative", 1: "positive"}  # the fine-tune's labels
    merged = load_result(tmp_path / "outputs" / "merged_ties").state_dict("sentiment")
    loaded = model.state_dict()
    for key, value in merged.items():
        name = key if key in loaded else f"bert.{key}"
        assert torch.equal(loaded[name], value), key


def test_readme_own_images_runs(tmp_path, monkeypatch):
    """ "Your own models", "Images": the section's command on a ViT base, two fine-tunes and
    their image data made here (tests/tiny_images.py), in its folder."""
    import tiny_images

    from mergebench.bench import job as bench
    from mergebench.util.config import compose_config

    tiny_images.make_image_world(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    images = section("Your own models").split("### Images\n", 1)[1]
    (block,) = re.findall(r"```bash\n(.*?)```", images, flags=re.S)
    (line,) = commands(block)
    assert line[0] == "mergebench"
    overrides = [*line[1:], "progress=false", f"taskset.cache_dir={tmp_path / 'hf'}"]
    summary = bench.run(compose_config(overrides), overrides)
    assert [s["task"] for s in summary["scores"]] == ["colour", "shade"]
    assert (tmp_path / "outputs" / "merged_images").is_dir()
