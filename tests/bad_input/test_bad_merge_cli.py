"""`mergebench-merge` given bad input: exit 2, one line naming the culprit, nothing lost."""

from __future__ import annotations

import errno
import json
import os

import pytest

import mergebench
from bad_input.conftest import BASE, FINETUNED, assert_one_line_error, tree_hash


# --- issue 1: data loss -----------------------------------------------------------------------
def test_decoy_result_json_folder_is_not_wiped(work, merge_cli):
    decoy = work / "d"
    decoy.mkdir()
    (decoy / "result.json").write_text("{}\n")
    (decoy / "keep.txt").write_text("x\n")
    outcome = merge_cli(*BASE, "output_dir=d")
    assert_one_line_error(outcome, "d: not empty and not a mergebench result")
    assert (decoy / "keep.txt").read_text() == "x\n"


def test_rerun_into_a_result_folder_keeps_the_users_files(work, merge_cli):
    assert merge_cli(*BASE, "output_dir=out", changes=True).code == 0
    (work / "out" / "NOTES.md").write_text("results of Tuesday\n")
    (work / "out" / "plots").mkdir()
    (work / "out" / "plots" / "fig.png").write_bytes(b"png")
    # The rerun writes no masks: the old mask file goes, the notes stay.
    outcome = merge_cli(*BASE, "method.mask=false", "output_dir=out", changes=True)
    assert outcome.code == 0, outcome.stderr
    assert (work / "out" / "NOTES.md").read_text() == "results of Tuesday\n"
    assert (work / "out" / "plots" / "fig.png").read_bytes() == b"png"
    assert not (work / "out" / "masks.safetensors").exists()
    assert mergebench.load_result(work / "out").method == "emr"
    assert not [p for p in work.iterdir() if p.name.startswith(".out.")]


def test_rerun_never_overwrites_a_users_file_named_like_ours(work, merge_cli):
    assert merge_cli(*BASE, "method.mask=false", "output_dir=out", changes=True).code == 0
    (work / "out" / "masks.safetensors").write_bytes(b"the user's own file")
    outcome = merge_cli(*BASE, "output_dir=out")
    assert_one_line_error(outcome, "masks.safetensors", "not written by mergebench")


# --- issue 2: nan / inf ------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e31"])
def test_scaling_nan_inf_huge(merge_cli, value):
    outcome = merge_cli(*BASE, "method=ties", f"method.scaling={value}", "output_dir=out")
    assert_one_line_error(outcome, "ties.scaling")


# --- issue 7: silently wrong input ------------------------------------------------------------
def test_exclude_as_a_string(merge_cli):
    outcome = merge_cli(
        "pretrained=pre.safetensors", FINETUNED, "exclude=classifier", "output_dir=o"
    )
    assert_one_line_error(outcome, "exclude: expected a list", "exclude=[classifier]")


def test_exclude_regex_without_brackets(merge_cli):
    outcome = merge_cli(
        "pretrained=pre.safetensors", FINETUNED, r"exclude=classifier\..*", "output_dir=o"
    )
    assert_one_line_error(outcome, "exclude: expected a list", r"exclude=[classifier\..*]")


def test_method_option_added_at_top_level(merge_cli):
    outcome = merge_cli(*BASE, "method=ties", "+k=0.1", "output_dir=out")
    assert_one_line_error(outcome, "k: is an option of method ties", "method.k=0.1")


def test_method_option_at_top_level_without_plus(merge_cli):
    outcome = merge_cli(*BASE, "method=ties", "k=0.1", "output_dir=out")
    assert_one_line_error(outcome, "k: no such setting", "method.k=")


def test_method_option_of_another_method_at_top_level(merge_cli):
    outcome = merge_cli(*BASE, "method=emr", "+k=0.1", "output_dir=out")
    assert_one_line_error(outcome, "k: is not a top-level setting", "method.k=0.1")


def test_unknown_top_level_key_added(merge_cli):
    outcome = merge_cli(*BASE, "+outptu_dir=x", "output_dir=out")
    assert_one_line_error(outcome, "outptu_dir: not a setting")


# --- issue 8: tracebacks ----------------------------------------------------------------------
def test_output_dir_is_a_file(work, merge_cli):
    outcome = merge_cli(*BASE, "output_dir=NOTES.md")
    assert_one_line_error(outcome, "NOTES.md: exists and is not a folder")


def test_output_dir_below_a_file(merge_cli):
    outcome = merge_cli(*BASE, "output_dir=NOTES.md/out")
    assert_one_line_error(outcome, "NOTES.md/out: cannot save the result (NOTES.md is a file")


@pytest.mark.parametrize(
    ("code", "says"), [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "no space left")]
)
def test_read_only_or_full_disk(work, merge_cli, monkeypatch, code, says):
    import mergebench.results.shards as shards

    real = shards._pwrite_all
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) < 3:  # the headers and a tensor written, then the device refuses
            return real(*args, **kwargs)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(shards, "_pwrite_all", failing)
    outcome = merge_cli(*BASE, "output_dir=out")
    assert_one_line_error(outcome, "out: cannot save the result", says)
    assert not (work / "out").exists()


def test_device_tpu(merge_cli):
    assert_one_line_error(merge_cli(*BASE, "device=tpu", "output_dir=o"), "device: 'tpu'")


def test_device_missing_gpu(merge_cli):
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert_one_line_error(merge_cli(*BASE, "device=cuda:7", "output_dir=o"), "device: 'cuda:7'")


def test_base_params_not_a_mapping(merge_cli):
    outcome = merge_cli(*BASE, "method=dare", "method.base_params=k", "output_dir=o")
    assert_one_line_error(outcome, "dare.base_params: expected a mapping")


def test_finetuned_a_single_path(merge_cli):
    outcome = merge_cli("pretrained=pre.safetensors", "finetuned=a.safetensors", "output_dir=o")
    assert_one_line_error(outcome, "finetuned: expected a mapping")


# --- issue 9: FIFO ----------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["pretrained", "finetuned"])
def test_fifo_checkpoint_does_not_hang(work, merge_cli, role):
    os.mkfifo(work / "pipe.safetensors")
    args = (
        ["pretrained=pipe.safetensors", FINETUNED]
        if role == "pretrained"
        else ["pretrained=pre.safetensors", "finetuned={a: a.safetensors, b: pipe.safetensors}"]
    )
    outcome = merge_cli(*args, "output_dir=o")
    assert_one_line_error(outcome, "pipe.safetensors: not a regular file")


# --- more of our own ----------------------------------------------------------------------
def test_unknown_method(merge_cli):
    outcome = merge_cli(*BASE, "method=emr_merging", "output_dir=o")
    assert_one_line_error(outcome, "method/emr_merging", "ties")


def test_unknown_method_option(merge_cli):
    outcome = merge_cli(*BASE, "method=ties", "method.kk=0.1", "output_dir=o")
    assert_one_line_error(outcome, "method.kk: no such setting")


def test_missing_pretrained_value(merge_cli):
    outcome = merge_cli(FINETUNED, "output_dir=o")
    assert_one_line_error(outcome, "pretrained: missing value")


def test_missing_output_dir_value(merge_cli):
    outcome = merge_cli(*BASE)
    assert_one_line_error(outcome, "output_dir: missing value")


def test_pretrained_not_found(merge_cli):
    outcome = merge_cli("pretrained=nope.safetensors", FINETUNED, "output_dir=o")
    assert_one_line_error(outcome, "nope.safetensors")


def test_finetuned_not_found(merge_cli):
    outcome = merge_cli(
        "pretrained=pre.safetensors", "finetuned={a: a.safetensors, b: bb.safetensors}",
        "output_dir=o",
    )  # fmt: skip
    assert_one_line_error(outcome, "bb.safetensors")


def test_empty_finetuned_mapping(merge_cli):
    outcome = merge_cli("pretrained=pre.safetensors", "finetuned={}", "output_dir=o")
    assert_one_line_error(outcome, "finetuned: expected a mapping")


def test_pretrained_of_unknown_format(merge_cli):
    outcome = merge_cli("pretrained=NOTES.md", FINETUNED, "output_dir=o")
    assert_one_line_error(outcome, "NOTES.md: unknown checkpoint format")


def test_pretrained_folder_without_checkpoint(work, merge_cli):
    (work / "empty").mkdir()
    outcome = merge_cli("pretrained=empty", FINETUNED, "output_dir=o")
    assert_one_line_error(outcome, "empty: no checkpoint found")


def test_truncated_safetensors(work, merge_cli):
    data = (work / "b.safetensors").read_bytes()
    (work / "b.safetensors").write_bytes(data[: len(data) - 16])
    outcome = merge_cli(*BASE, "output_dir=o")
    assert_one_line_error(outcome, "b.safetensors")


def test_garbage_safetensors(work, merge_cli):
    (work / "c.safetensors").write_bytes(os.urandom(64))
    outcome = merge_cli(*BASE, "output_dir=o")
    assert_one_line_error(outcome, "c.safetensors: not a readable safetensors file")


@pytest.mark.parametrize(
    ("option", "culprit"),
    [
        ("method=ties method.k=2", "ties.k"),
        ("method=ties method.scaling=abc", "ties.scaling"),
        ("method=emr method.rescale=maybe", "emr.rescale"),
        ("method=ties method.aggregate=median", "ties.aggregate"),
    ],
)
def test_bad_method_option_values(merge_cli, option, culprit):
    outcome = merge_cli(*BASE, *option.split(), "output_dir=o")
    assert_one_line_error(outcome, culprit)


def test_heads_separate_not_a_flag(merge_cli):
    outcome = merge_cli(*BASE, "heads_separate=maybe", "output_dir=o")
    assert_one_line_error(outcome, "heads_separate")


def test_exclude_invalid_regex(merge_cli):
    outcome = merge_cli("pretrained=pre.safetensors", FINETUNED, "exclude=['[(']", "output_dir=o")
    assert_one_line_error(outcome, "exclude")


def test_exclude_matching_no_key(merge_cli):
    outcome = merge_cli(
        "pretrained=pre.safetensors", FINETUNED, r"exclude=[classifier\..*, head]", "output_dir=o"
    )
    assert_one_line_error(outcome, "exclude", "head")


def test_heads_of_different_shapes_without_exclude(merge_cli):
    outcome = merge_cli("pretrained=pre.safetensors", FINETUNED, "output_dir=o")
    assert_one_line_error(outcome, "classifier.weight")


def test_output_dir_with_foreign_files(work, merge_cli):
    (work / "results").mkdir()
    (work / "results" / "table.csv").write_text("a,b\n")
    outcome = merge_cli(*BASE, "output_dir=results")
    assert_one_line_error(outcome, "results: not empty and not a mergebench result")


def test_output_dir_with_a_hand_edited_result(work, merge_cli):
    assert merge_cli(*BASE, "output_dir=out", changes=True).code == 0
    meta = json.loads((work / "out" / "result.json").read_text())
    meta["manifest"]["files"]["NOTES.md"] = {"blake3": "0" * 64, "size": 9}
    (work / "out" / "result.json").write_text(json.dumps(meta))
    (work / "out" / "NOTES.md").write_text("my notes\n")
    before = tree_hash(work / "out")
    outcome = merge_cli(*BASE, "output_dir=out")
    assert_one_line_error(outcome, "result.json: edited since it was saved")
    assert tree_hash(work / "out") == before


@pytest.mark.parametrize("value", ["lots", "0", "-5MB", "[1,2]"])
def test_bad_shard_size(work, merge_cli, value):
    outcome = merge_cli(*BASE, f"shard_size={value}", "output_dir=out")
    assert_one_line_error(outcome, "shard_size:")
    assert not (work / "out").exists()
