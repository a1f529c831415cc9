"""The README's Python example runs as written (on small local checkpoints)."""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import save_file

README = Path(__file__).resolve().parents[1] / "README.md"


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
