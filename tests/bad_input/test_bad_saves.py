"""Round 3 (issue 26), data loss: a save never deletes a file its own merge reads, follows a
symlinked output folder, and an interrupt during publication says what was completed and
leaves no `.old-*` folder."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import save_file

import mergebench
from bad_input.conftest import HEAD, assert_one_line_error, record, tiny_models
from mergebench.util.errors import MergeBenchError


def refused(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(MergeBenchError, match=match) as info:
        call(*args, **kwargs)
    record(str(info.value))
    return str(info.value)


@pytest.fixture
def earlier(tmp_path):
    """An earlier TIES result whose model.safetensors becomes the next merge's pretrained."""
    pre, finetuned = tiny_models()
    folder = tmp_path / "out"
    mergebench.merge("ties", pre, finetuned, exclude=HEAD, progress=False, output_dir=folder)
    return folder, finetuned


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_streamed_merge_into_the_folder_of_its_own_pretrained(earlier):
    # Before: the save deleted out/model.safetensors (the old manifest lists it) while the new
    # EMR result referenced it: the earlier result lost and the new one unloadable.
    folder, finetuned = earlier
    before = snapshot(folder)
    refused(
        "holds .*model.safetensors, which this merge reads",
        mergebench.merge, "emr", folder / "model.safetensors", finetuned, exclude=HEAD,
        progress=False, output_dir=folder,
    )  # fmt: skip
    assert snapshot(folder) == before


def test_in_memory_result_saved_over_its_pretrained(earlier):
    folder, finetuned = earlier
    before = snapshot(folder)
    result = mergebench.merge("emr", folder / "model.safetensors", finetuned, exclude=HEAD,
                              progress=False)  # fmt: skip
    refused("which this result reads", result.save, folder)
    assert snapshot(folder) == before
    assert mergebench.load_result(folder).method == "ties"


def test_loaded_result_saved_over_itself(earlier):
    folder, _ = earlier
    before = snapshot(folder)
    refused("which this result reads", mergebench.load_result(folder).save, folder)
    assert snapshot(folder) == before


def test_cli_merge_into_the_folder_of_its_own_pretrained(work, merge_cli):
    first = merge_cli("method=ties", "pretrained=pre.safetensors",
                      "finetuned={a: a.safetensors, b: b.safetensors, c: c.safetensors}",
                      r"exclude=[classifier\..*]", "output_dir=res", changes=True)  # fmt: skip
    assert first.code == 0, first.stderr
    outcome = merge_cli("method=emr", "pretrained=res/model.safetensors",
                        "finetuned={a: a.safetensors, b: b.safetensors, c: c.safetensors}",
                        r"exclude=[classifier\..*]", "output_dir=res")  # fmt: skip
    assert_one_line_error(outcome, "res", "which this merge reads")


def test_symlinked_output_folder_is_written_through(tmp_path, earlier):
    # Before: the link was replaced by a new folder and its target kept the old result.
    folder, finetuned = earlier
    link = tmp_path / "latest"
    link.symlink_to(folder, target_is_directory=True)
    pre, _ = tiny_models()
    mergebench.merge("task_arithmetic", pre, finetuned, exclude=HEAD, progress=False,
                     output_dir=link)  # fmt: skip
    assert link.is_symlink() and mergebench.load_result(folder).method == "task_arithmetic"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupt_while_publishing_says_the_folder_is_complete(earlier, monkeypatch):
    # Before: Ctrl-C just after the swap printed "interrupted" over a replaced folder and
    # left the half-deleted earlier result in `.out.old-*`.
    from mergebench.util import fs

    folder, finetuned = earlier
    real_rmtree = fs.shutil.rmtree
    sent = []

    def rmtree_after_a_ctrl_c(path, *args, **kwargs):
        if not sent and ".old-" in str(path):
            sent.append(path)
            signal.raise_signal(signal.SIGINT)  # arrives inside the publication
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(fs.shutil, "rmtree", rmtree_after_a_ctrl_c)
    pre, _ = tiny_models()
    with pytest.raises(KeyboardInterrupt, match="saved in full before the interrupt"):
        mergebench.merge("task_arithmetic", pre, finetuned, exclude=HEAD, progress=False,
                         output_dir=folder)  # fmt: skip
    assert sent and mergebench.load_result(folder).method == "task_arithmetic"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".out.")]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cli_interrupt_message_says_what_was_completed(work, merge_cli, monkeypatch):
    import mergebench.cli.merge as merge_module

    def interrupted_after_saving(*args, **kwargs):
        raise KeyboardInterrupt("res: saved in full before the interrupt")

    monkeypatch.setattr(merge_module, "merge", interrupted_after_saving)
    outcome = merge_cli("method=ties", "pretrained=pre.safetensors",
                        "finetuned={a: a.safetensors}", "output_dir=res")  # fmt: skip
    assert outcome.code == 130
    assert outcome.stderr.strip() == (
        "mergebench-merge: interrupted (res: saved in full before the interrupt)"
    )
    record(outcome.stderr.strip())


def test_save_into_a_folder_beside_its_pretrained_is_fine(tmp_path, earlier):
    # Only the output folder itself is protected: a sibling folder works as before.
    folder, finetuned = earlier
    result = mergebench.merge("emr", folder / "model.safetensors", finetuned, exclude=HEAD,
                              progress=False, output_dir=tmp_path / "emr")  # fmt: skip
    assert sorted(result.tasks) == ["a", "b", "c"] and os.path.isdir(tmp_path / "emr")
    assert torch.is_tensor(next(iter(result.state_dict("a").values())))
    save_file({"x": torch.ones(1)}, tmp_path / "unrelated.safetensors")


def test_a_removed_run_folder_leaves_no_log_handler_behind(work, merge_cli):
    """A refused command removes its run folder: the job-log handler Hydra opened there goes
    too, or the next log line of this process (transformers' warnings) would fail."""
    import logging

    outcome = merge_cli("method=ties", "pretrained=missing.safetensors",
                        "finetuned={a: a.safetensors}", "output_dir=res")  # fmt: skip
    assert outcome.code == 2
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for handler in [h for lg in loggers for h in getattr(lg, "handlers", [])]:
        path = getattr(handler, "baseFilename", None)
        assert path is None or os.path.isdir(os.path.dirname(path)), path
    logging.getLogger("transformers").warning("a warning after a refused command")
