"""Checkpoint formats, key selection and bad input (methods.md: which tensors are merged)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import mergebench
from mergebench.engine.checkpoints import open_checkpoint
from mergebench.engine.keyplan import plan_keys
from mergebench.engine.pool import ModelPool
from mergebench.util.errors import MergeBenchError

HEAD = [r"classifier\..*"]


def save_all(tmp_path, pre, finetuned, fmt="safetensors"):
    def write(state, name):
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "safetensors":
            save_file(state, path)
        else:
            torch.save(state, path)
        return str(path)

    return write(pre, "pre"), {t: write(s, t) for t, s in finetuned.items()}


def test_key_plan_classifies_merged_copied_and_task_specific(tiny_models):
    pre, finetuned = tiny_models
    plan = plan_keys(ModelPool.from_checkpoints(pre, finetuned, exclude=HEAD))
    assert plan.merged == ["layer.weight", "layer.bias", "out.weight"]
    assert plan.copied == ["position_ids"]
    assert plan.task_specific == {t: ["classifier.weight"] for t in "abc"}
    assert plan.pretrained_excluded == ["classifier.weight"]


def test_each_task_keeps_its_own_head_and_copied_buffers(tiny_models):
    pre, finetuned = tiny_models
    for method in ("task_arithmetic", "emr"):
        result = mergebench.merge(method, pre, finetuned, exclude=HEAD, progress=False)
        for task in "abc":
            state = result.state_dict(task)
            assert torch.equal(state["classifier.weight"], finetuned[task]["classifier.weight"])
            assert torch.equal(state["position_ids"], pre["position_ids"])
            assert set(state) == set(pre)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_files_and_memory_give_identical_results(tmp_path, tiny_models, fmt):
    pre, finetuned = tiny_models
    pre_path, ft_paths = save_all(tmp_path, pre, finetuned, fmt)
    from_files = mergebench.merge("ties", pre_path, ft_paths, exclude=HEAD, progress=False)
    in_memory = mergebench.merge("ties", pre, finetuned, exclude=HEAD, progress=False)
    for key, value in in_memory.state_dict("a").items():
        assert torch.equal(from_files.state_dict("a")[key], value), key


def test_hugging_face_folders_single_and_sharded(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = BertModel(config)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size=5000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    single = open_checkpoint(tmp_path / "single")
    sharded = open_checkpoint(tmp_path / "sharded")
    assert sorted(single.keys()) == sorted(sharded.keys())
    for key in single.keys():
        assert torch.equal(single.get(key), sharded.get(key))
        assert torch.equal(single.get(key), model.state_dict()[key])


def test_pt_files_are_loaded_without_unpickling_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"w": Evil()}, handle)
    with pytest.raises(MergeBenchError, match="holds Python code or objects"):
        open_checkpoint(path)
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "wrapped.pt")
    assert torch.equal(open_checkpoint(tmp_path / "wrapped.pt").get("w"), torch.ones(2))


def test_missing_and_corrupt_checkpoints_are_named(tmp_path, tiny_models):
    pre, finetuned = tiny_models
    pre_path, ft_paths = save_all(tmp_path, pre, finetuned)
    with pytest.raises(MergeBenchError, match="nope.safetensors"):
        mergebench.merge(
            "emr", pre_path, {**ft_paths, "a": str(tmp_path / "nope.safetensors")}, exclude=HEAD
        )
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(MergeBenchError, match="corrupt.safetensors"):
        mergebench.merge("emr", pre_path, {**ft_paths, "a": str(corrupt)}, exclude=HEAD)
    (tmp_path / "bad.index.json").write_text(json.dumps({"nothing": 1}))
    with pytest.raises(MergeBenchError, match="bad.index.json"):
        open_checkpoint(tmp_path / "bad.index.json")
    with pytest.raises(MergeBenchError, match="unknown checkpoint format"):
        (tmp_path / "x.txt").write_text("hi")
        open_checkpoint(tmp_path / "x.txt")


def test_mismatched_shapes_are_rejected_naming_key_and_shapes(tiny_models):
    pre, finetuned = tiny_models
    finetuned["b"]["out.weight"] = torch.zeros(4, 7)
    with pytest.raises(MergeBenchError, match=r"'out.weight': shape \[4, 7\] .* \[4, 6\]"):
        mergebench.merge("emr", pre, finetuned, exclude=HEAD)


def test_a_missing_key_is_rejected(tiny_models):
    pre, finetuned = tiny_models
    del finetuned["c"]["layer.bias"]
    with pytest.raises(MergeBenchError, match=r"finetuned\[c\].*missing key 'layer.bias'"):
        mergebench.merge("emr", pre, finetuned, exclude=HEAD)


def test_an_extra_key_is_rejected(tiny_models):
    pre, finetuned = tiny_models
    finetuned["a"]["extra.weight"] = torch.zeros(2)
    with pytest.raises(MergeBenchError, match="'extra.weight' is not in"):
        mergebench.merge("emr", pre, finetuned, exclude=HEAD)


def test_a_missing_head_is_an_error_unless_heads_come_separately(tiny_models):
    pre, finetuned = tiny_models
    del finetuned["b"]["classifier.weight"]
    with pytest.raises(MergeBenchError, match="task-specific key 'classifier.weight' is missing"):
        mergebench.merge("emr", pre, finetuned, exclude=HEAD)
    result = mergebench.merge(
        "emr", pre, finetuned, exclude=HEAD, heads_separate=True, progress=False
    )
    # b has no head of its own: it gets the pretrained one, the others keep theirs.
    assert torch.equal(result.state_dict("b")["classifier.weight"], pre["classifier.weight"])
    assert torch.equal(
        result.state_dict("a")["classifier.weight"], finetuned["a"]["classifier.weight"]
    )


def test_without_exclude_different_head_shapes_are_rejected(tiny_models):
    pre, finetuned = tiny_models
    with pytest.raises(MergeBenchError, match="classifier.weight"):
        mergebench.merge("emr", pre, finetuned)


def test_integer_buffers_must_be_equal(tiny_models):
    pre, finetuned = tiny_models
    finetuned["a"]["position_ids"] = torch.arange(7) + 1
    with pytest.raises(MergeBenchError, match="'position_ids': non-floating tensor differs"):
        mergebench.merge("emr", pre, finetuned, exclude=HEAD)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(tiny_models, bad):
    pre, finetuned = tiny_models
    finetuned["b"]["out.weight"][0, 0] = bad
    with pytest.raises(MergeBenchError, match=r"finetuned\[b\].*'out.weight' has non-finite"):
        mergebench.merge("task_arithmetic", pre, finetuned, exclude=HEAD)


def test_bad_exclude_regex_is_named(tiny_models):
    pre, finetuned = tiny_models
    with pytest.raises(MergeBenchError, match="exclude: invalid regex"):
        mergebench.merge("emr", pre, finetuned, exclude=["classifier(["])


def test_exclude_patterns_match_whole_keys():
    pre = {"classifier_proj.weight": torch.zeros(2), "classifier.weight": torch.zeros(2)}
    finetuned = {"a": {k: v + 1 for k, v in pre.items()}, "b": {k: v + 3 for k, v in pre.items()}}
    plan = plan_keys(ModelPool.from_checkpoints(pre, finetuned, exclude=HEAD))
    assert plan.merged == ["classifier_proj.weight"]


def test_an_exclude_pattern_that_matches_no_key_is_an_error():
    pre = {"encoder.w": torch.zeros(2), "classifier.weight": torch.zeros(2)}
    finetuned = {t: {k: v + 1 for k, v in pre.items()} for t in ("a", "b")}
    with pytest.raises(MergeBenchError, match=r"exclude: pattern 'classifier' matches no key"):
        mergebench.merge("task_arithmetic", pre, finetuned, exclude=["classifier"], progress=False)
    merged = mergebench.merge(
        "task_arithmetic", pre, finetuned, exclude=[r"classifier\..*"], progress=False
    )
    assert torch.equal(merged.state_dict("a")["classifier.weight"], torch.ones(2))  # its own head


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_outputs_keep_the_pretrained_dtype(dtype):
    pre = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=dtype)}
    finetuned = {t: {"w": pre["w"] + i + 1} for i, t in enumerate("ab")}
    for method in ("weight_averaging", "ties", "emr"):
        state = mergebench.merge(method, pre, finetuned, progress=False).state_dict("a")
        assert state["w"].dtype == dtype, method
    averaged = mergebench.merge("weight_averaging", pre, finetuned, progress=False).state_dict()
    torch.testing.assert_close(averaged["w"], pre["w"] + 1.5)
