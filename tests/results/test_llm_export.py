"""`mergebench-export`: a merged tiny Llama as a `save_pretrained` folder that
`AutoModelForCausalLM.from_pretrained` loads in a fresh process without mergebench, with the
weights of `result.state_dict(task)` bit for bit (`results/export.py`, `cli/export.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_llm import VOCAB, make_llm

import mergebench
from mergebench.cli.export import main as export_main
from mergebench.results import export as export_module

pytest.importorskip("transformers")

# Loads each folder with transformers alone (mergebench is not importable: PYTHONPATH is
# cleared and the check below fails if it was imported), saves its state dict and a short
# greedy generation.
LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM
out = {}
for folder, dump in zip(sys.argv[1::2], sys.argv[2::2]):
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, dump)
    ids = model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, do_sample=False,
                         pad_token_id=0)
    out[folder] = ids[0].tolist()
assert not any(name.startswith("mergebench") for name in sys.modules)
print(json.dumps(out))
"""


def _load_fresh(folders: list[Path], tmp_path: Path) -> tuple[dict, dict[Path, dict]]:
    args, dumps = [], {}
    for i, folder in enumerate(folders):
        dumps[folder] = tmp_path / f"state{i}.pt"
        args += [str(folder), str(dumps[folder])]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", LOADER, *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    generated = json.loads(done.stdout.strip().splitlines()[-1])
    return generated, {f: torch.load(dumps[f], weights_only=True) for f in folders}


def _same(loaded: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype=None) -> None:
    assert want, "nothing to compare"
    for key, tensor in want.items():
        expected = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert loaded[key].dtype == expected.dtype, key
        assert torch.equal(loaded[key], expected), key
    assert set(loaded) - set(want) <= {"lm_head.weight"}  # a tied head: the embedding


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = make_llm(root / "base", "llama", seed=0, tie=True, shard="20KB")
    experts = {t: make_llm(root / t, "llama", seed=i + 1, tie=True, like=base, shard="20KB")
               for i, t in enumerate(("math", "code"))}  # fmt: skip
    ties = mergebench.merge("ties", base, experts, progress=False, output_dir=root / "ties")
    emr = mergebench.merge("emr", base, experts, progress=False, output_dir=root / "emr",
                           out_dtype="float32")  # fmt: skip
    return root, base, experts, ties, emr


def test_exported_folders_load_without_mergebench(llama, tmp_path, capsys):
    root, base, _, ties, emr = llama
    export_main([str(root / "ties"), str(tmp_path / "ties"), "--shard-size", "20KB"])
    export_main([str(root / "emr"), str(tmp_path / "emr"), "--all-tasks"])
    assert "wrote" in capsys.readouterr().out
    folders = [tmp_path / "ties", tmp_path / "emr" / "math", tmp_path / "emr" / "code"]
    names = set(os.listdir(folders[0]))
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md",
            "model.safetensors.index.json"} <= names  # fmt: skip
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded
    generated, states = _load_fresh(folders, tmp_path)
    _same(states[folders[0]], ties.state_dict())
    _same(states[folders[1]], emr.state_dict("math"), torch.float32)  # the recorded out_dtype
    _same(states[folders[2]], emr.state_dict("code"), torch.float32)
    assert all(len(ids) == 8 for ids in generated.values())  # 4 tokens generated
    config = json.loads((folders[1] / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    card = (folders[1] / "README.md").read_text()
    assert "# emr merge (task math)" in card and f"`{base}`" in card
    recorded = json.loads((root / "emr" / "result.json").read_text())["pretrained_digest"]
    assert f"digest of its tensors the merge applied the deltas to: `blake3:{recorded}`" in card
    assert "expert `code`" in card


def test_task_conditioned_result_needs_a_task(llama, tmp_path, capsys):
    root, *_ = llama
    with pytest.raises(SystemExit) as exit_:
        export_main([str(root / "emr"), str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mergebench-export: error: ") and "pass --task (one of math, code)" in err
    assert "\n" not in err and not (tmp_path / "out").exists()


def test_existing_folder_refused_unless_force(llama, tmp_path, capsys):
    root, *_ = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        export_main([str(root / "emr"), str(out), "--task", "code"])
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert os.listdir(out) == ["notes.txt"]
    export_main([str(root / "emr"), str(out), "--task", "code", "--force"])
    assert "notes.txt" not in os.listdir(out) and (out / "config.json").is_file()


def test_failure_leaves_nothing_half_written(llama, tmp_path, monkeypatch, capsys):
    root, *_ = llama

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "write_tensors", broken)
    with pytest.raises(SystemExit):
        export_main([str(root / "ties"), str(tmp_path / "out")])
    assert "No space left on device" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # neither the folder nor its temp sibling


def test_bad_inputs_are_one_line(llama, tmp_path, capsys):
    root, *_ = llama
    cases = [
        ([str(tmp_path / "nothing"), str(tmp_path / "o")], "result.json"),
        ([str(root / "emr"), str(tmp_path / "o"), "--task", "art"], "no task 'art'"),
        ([str(root / "ties"), str(tmp_path / "o"), "--shard-size", "big"], "--shard-size"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exit_:
            export_main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and words in err and "\n" not in err, err
    in_memory = mergebench.merge(
        "ties", {"w": torch.ones(2)}, {"a": {"w": torch.zeros(2)}}, progress=False,
        output_dir=tmp_path / "mem",
    )  # fmt: skip
    assert in_memory.tasks == ["a"]
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "mem"), str(tmp_path / "o")])
    assert "records no base checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_push_to_hub_uploads_the_folder(llama, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    root, *_ = llama
    calls = []

    def upload_folder(self, **kwargs):
        calls.append(kwargs)
        return "https://huggingface.co/me/merged/commit/abc"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    export_main([str(root / "ties"), str(tmp_path / "out"), "--push-to-hub", "me/merged"])
    assert calls == [{"folder_path": str(tmp_path / "out"), "repo_id": "me/merged",
                      "repo_type": "model"}]  # fmt: skip
    assert "uploaded to me/merged" in capsys.readouterr().out


def test_union_vocab_exports_the_tokenizer_that_defines_the_rows(tmp_path):
    base = make_llm(tmp_path / "base", "llama", seed=0)
    extra = make_llm(tmp_path / "extra", "llama", seed=1, like=base, extra_tokens=["x1", "x2"])
    plain = make_llm(tmp_path / "plain", "llama", seed=2, like=base)
    result = mergebench.merge("task_arithmetic", base, {"extra": extra, "plain": plain},
                              progress=False, vocab="union", output_dir=tmp_path / "r")  # fmt: skip
    export_main([str(tmp_path / "r"), str(tmp_path / "out")])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == VOCAB + 2
    tokens = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["added_tokens"]
    assert {"x1", "x2"} <= {t["content"] for t in tokens}
    _, states = _load_fresh([tmp_path / "out"], tmp_path)
    _same(states[tmp_path / "out"], result.state_dict())
