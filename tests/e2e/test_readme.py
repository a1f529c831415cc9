"""The README's Python example runs as written (on small local checkpoints)."""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import save_file

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_example_runs(tmp_path, tiny_models, monkeypatch):
    pre, finetuned = tiny_models
    save_file(pre, tmp_path / "pre.safetensors")
    save_file(finetuned["a"], tmp_path / "a.safetensors")
    (tmp_path / "b_dir").mkdir()
    save_file(finetuned["b"], tmp_path / "b_dir" / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)
    r, r2, r3 = namespace["r"], namespace["r2"], namespace["r3"]
    assert r.tasks == ["a", "b"]
    for task in r.tasks:
        for key, value in r.state_dict(task).items():
            assert (r2.state_dict(task)[key] == value).all(), key
            assert (r3.state_dict(task)[key] == value).all(), key
    assert (tmp_path / "out_streamed" / "unified.safetensors.index.json").exists()
    assert (tmp_path / "out" / "masks.safetensors").exists()


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
    assert [argv[0] for argv in lines] == ["mergebench", "mergebench-leaderboard"]
    overrides = [*lines[0][1:], "progress=false", f"taskset.cache_dir={tmp_path / 'hf'}"]
    summary = bench.run(compose_config(overrides), overrides)
    assert [s["task"] for s in summary["scores"]] == ["sentiment", "topic"]
    assert (tmp_path / "outputs" / "merged_ties").is_dir()
    capsys.readouterr()
    assert leaderboard.main(lines[1][1:]) == 0
    board = capsys.readouterr().out
    for row in ("individual", "pretrained", "ties"):
        assert f"| {row} " in board, board


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
