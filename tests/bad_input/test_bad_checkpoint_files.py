"""Round 3 of the catalogue (issue 26): checkpoint files that are subtly wrong, and
`mergebench-convert` given files that are not what they claim. Each case failed before its
fix: a traceback, a silently wrong reading, advice to unpickle garbage, or a user's file
replaced."""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergebench
from bad_input.conftest import HEAD, record, tiny_models
from mergebench.cli import convert
from mergebench.engine.checkpoints import open_checkpoint
from mergebench.util.errors import MergeBenchError


def raises(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(MergeBenchError, match=match) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    record(message)
    return message


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


# --- odd tensors -------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8")
def test_float8_safetensors_refused_when_opened(tmp_path):
    pre, finetuned = tiny_models()
    pre = dict(pre, scale=torch.ones(4).to(torch.float8_e4m3fn))
    save_file(pre, tmp_path / "pre.safetensors")
    # Before: the merge succeeded and `state_dict()` then raised "Promotion for Float8 Types".
    message = raises(
        "tensor 'scale' has dtype F8_E4M3", open_checkpoint, tmp_path / "pre.safetensors"
    )
    assert str(tmp_path / "pre.safetensors") in message


@pytest.mark.skipif(not hasattr(torch, "float8_e5m2"), reason="this torch has no float8")
def test_float8_in_a_torch_file_refused(tmp_path):
    path = tmp_path / "pre.pt"
    torch.save({"w": torch.ones(3).to(torch.float8_e5m2)}, path)
    raises("tensor 'w' has dtype float8_e5m2", open_checkpoint, path)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8")
def test_float8_in_memory_refused_by_the_api():
    pre, finetuned = tiny_models()
    finetuned["a"]["layer.bias"] = finetuned["a"]["layer.bias"].to(torch.float8_e4m3fn)
    raises(
        "'layer.bias' has dtype float8_e4m3fn",
        mergebench.merge,
        "ties",
        pre,
        finetuned,
        exclude=HEAD,
    )


def test_header_nested_too_deeply(tmp_path):
    text = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    raises("nested too deeply", open_checkpoint, path)


@pytest.mark.parametrize(
    ("shape", "offsets"),
    [("44", [0, 64]), ([2.7], [0, 8]), ([4], [0.0, 16]), ([True], [0, 4]), ([4], [0, 16, 1])],
    ids=["shape-string", "shape-float", "offset-float", "shape-bool", "three-offsets"],
)
def test_header_numbers_must_be_integers(tmp_path, shape, offsets):
    # int("44") read a string shape as [4, 4] and int(2.7) a float as 2; safetensors refuses both.
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}
    path = raw_safetensors(tmp_path / "x.safetensors", header, bytes(64))
    raises("malformed entry for tensor 'w'", open_checkpoint, path)


def test_header_dtype_not_a_string(tmp_path):
    header = {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}
    path = raw_safetensors(tmp_path / "x.safetensors", header, bytes(4))
    raises("unknown dtype", open_checkpoint, path)


# --- shard indexes -----------------------------------------------------------------------------
def write_index(folder: Path, weight_map: dict[str, str]) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_index_omitting_a_key_a_shard_holds(tmp_path):
    save_file({"w": torch.ones(2), "extra": torch.ones(1)}, tmp_path / "s1.safetensors")
    write_index(tmp_path, {"w": "s1.safetensors"})
    raises("holds tensor 'extra', which the shard index does not list", open_checkpoint, tmp_path)


def test_index_omitting_a_key_of_a_torch_shard(tmp_path):
    torch.save({"w": torch.ones(2), "extra": torch.ones(1)}, tmp_path / "s1.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"w": "s1.bin"}})
    )
    raises("holds tensor 'extra', which the shard index does not list", open_checkpoint, tmp_path)


def test_index_naming_one_shard_two_ways_reads_it_once(tmp_path):
    # Before: "tensor 'v' is also in s1.safetensors" about a shard and itself.
    save_file({"w": torch.ones(2), "v": torch.full((3,), 2.0)}, tmp_path / "s1.safetensors")
    write_index(tmp_path, {"w": "./s1.safetensors", "v": "s1.safetensors"})
    source = open_checkpoint(tmp_path)
    assert sorted(source.keys()) == ["v", "w"]
    assert torch.equal(source.get("v"), torch.full((3,), 2.0))


# --- files that are not what their name says ---------------------------------------------------
GARBAGE = {
    "empty": (b"", "is empty"),
    "text": (b"weights: see the README\n" * 20, "is a text file"),
    "random": (bytes(range(7, 256)) * 4, "is not a torch checkpoint"),
    "safetensors": (None, "is a safetensors file"),
}


def garbage_file(tmp_path: Path, kind: str, suffix: str) -> Path:
    path = tmp_path / f"{kind}{suffix}"
    content = GARBAGE[kind][0]
    if content is None:
        save_file({"w": torch.ones(2)}, path)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_merge_reader_says_what_a_non_torch_file_is(tmp_path, kind):
    path = garbage_file(tmp_path, kind, ".bin")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = raises(GARBAGE[kind][1], open_checkpoint, path)
    assert "trust-pickle" not in message and not caught


def run_convert(args: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        convert.main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def one_line(code: int, err: list[str], *culprits: str, expected: int = 2) -> str:
    assert code == expected and len(err) == 1, err
    assert "Traceback" not in err[0]
    for culprit in culprits:
        assert culprit in err[0], err[0]
    record(err[0])
    return err[0]


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_convert_says_what_a_non_torch_file_is(tmp_path, capsys, kind):
    path = garbage_file(tmp_path, kind, ".pt")
    target = tmp_path / "out.safetensors"
    # Before: "a pickled Python object ... rerun with --trust-pickle" (advice to unpickle garbage).
    line = one_line(*run_convert([str(path), str(target)], capsys), str(path), GARBAGE[kind][1])
    assert "trust-pickle" not in line and not target.exists()


def test_convert_pickle_refusal_has_no_torch_warning(tmp_path, capsys):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module: needs unpickling
    line = one_line(
        *run_convert([str(path), str(tmp_path / "o.safetensors")], capsys), "--trust-pickle"
    )
    assert "UserWarning" not in line


@pytest.fixture
def state_pt(tmp_path) -> Path:
    path = tmp_path / "state.pt"
    torch.save({"model.w": torch.ones(2), "model.b": torch.zeros(1)}, path)
    return path


def test_convert_refuses_to_replace_a_file_without_force(tmp_path, capsys, state_pt):
    target = tmp_path / "mine.safetensors"
    target.write_bytes(b"the user's own file")
    one_line(*run_convert([str(state_pt), str(target)], capsys), str(target), "--force")
    assert target.read_bytes() == b"the user's own file"
    code, _ = run_convert([str(state_pt), str(target), "--force"], capsys)
    assert code == 0 and set(load_file(str(target))) == {"w", "b"}


def test_convert_into_a_folder_blames_the_target(tmp_path, capsys, state_pt):
    folder = tmp_path / "x.safetensors"
    folder.mkdir()
    one_line(*run_convert([str(state_pt), str(folder)], capsys), str(folder), "is a folder")
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob(".x.safetensors.tmp*"))


def test_convert_failure_removes_its_temp_file(tmp_path, capsys, state_pt, monkeypatch):
    import safetensors.torch

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    target = tmp_path / "out.safetensors"
    one_line(*run_convert([str(state_pt), str(target)], capsys), str(target), "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_convert_interrupted_says_so_and_leaves_nothing(tmp_path, capsys, state_pt, monkeypatch):
    import safetensors.torch

    def interrupted(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    code, err = run_convert([str(state_pt), str(tmp_path / "out.safetensors")], capsys)
    assert err == ["mergebench-convert: interrupted"] and code == 130
    record(err[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_convert_strip_prefix_that_strips_nothing(tmp_path, capsys, state_pt):
    target = tmp_path / "out.safetensors"
    one_line(
        *run_convert([str(state_pt), str(target), "--strip-prefix", "encoder."], capsys),
        "--strip-prefix",
        "'encoder.'",
    )
    assert not target.exists()
    # The default prefix stays lenient: a file without the wrapper converts as it is.
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    code, _ = run_convert([str(plain), str(target)], capsys)
    assert code == 0 and set(load_file(str(target))) == {"w"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_convert_into_a_read_only_folder(tmp_path, capsys, state_pt):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        one_line(*run_convert([str(state_pt), str(folder / "o.safetensors")], capsys), str(folder))
    finally:
        folder.chmod(0o700)


# --- make variables ----------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("SEEDS", "abc", "expected integers >= 0"),
        ("SEEDS", "-1", "expected integers >= 0"),
        ("SEEDS", "1.5", "expected integers >= 0"),
        ("SEEDS", "0 1", "separated by commas"),
        ("SEEDS", "", "expected integers >= 0"),
        ("SEEDS", "0,1,01", "a seed is listed twice"),
        ("MUTATION_JOBS", "0", "expected an integer >= 1"),
    ],
)
def test_make_variables_checked_before_any_work(variable, value, says):
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    # -n: nothing runs even if the check were missing (the zoo would train for minutes).
    # A make of its own, as a user's: not a sub-make of `make test` (which would print
    # "Entering directory" and pass its own variables down).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "bench", f"{variable}={value}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"{variable}={value}: " in lines[0] and says in lines[0]
    assert done.stdout == ""
    record(lines[0])


# --- 0-size tensors ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["emr", "mask_rescale"])
def test_zero_size_tensor_in_emr_and_mask_rescale(method):
    # Before: `range() arg 3 must not be zero` (a block size of 0); the other methods coped.
    pre, finetuned = tiny_models()
    empty = {"empty.weight": torch.zeros(0, 4)}
    with_empty = mergebench.merge(
        method, {**pre, **empty}, {t: {**s, **empty} for t, s in finetuned.items()},
        exclude=HEAD, progress=False,
    )  # fmt: skip
    without = mergebench.merge(method, pre, finetuned, exclude=HEAD, progress=False)
    assert with_empty.rescalers == without.rescalers  # an empty tensor changes no statistic
    for task in finetuned:
        merged = with_empty.state_dict(task)
        assert merged["empty.weight"].shape == (0, 4)
        for key, value in without.state_dict(task).items():
            assert torch.equal(merged[key], value), key


@pytest.mark.parametrize("method", ["ties", "emr", "task_arithmetic"])
def test_non_finite_task_specific_head_refused(method):
    # Before: nan in an excluded head was kept (and scored), while refused everywhere else.
    pre, finetuned = tiny_models()
    finetuned["b"]["classifier.weight"][0, 0] = float("nan")
    raises(
        r"finetuned\[b\].*tensor 'classifier.weight' has non-finite values",
        mergebench.merge, method, pre, finetuned, exclude=HEAD, progress=False,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["dare", "mask_rescale"])
def test_method_base_null(method):
    pre, finetuned = tiny_models()
    raises(
        rf"{method}.base: expected a method name \(e.g. ties\), got None",
        mergebench.merge, method, pre, finetuned, exclude=HEAD, base=None, progress=False,
    )  # fmt: skip
