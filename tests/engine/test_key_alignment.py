"""Key alignment: a base saved as `BertModel`, fine-tunes saved as
`BertForSequenceClassification` (issue 22 item 3), and the `key_map`/`strip_prefix` options.

The models are tiny hub-format folders written here by transformers' own `save_pretrained`;
every merge through the alignment must equal the same merge of state dicts renamed by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergebench
from mergebench.engine.pool import ModelPool
from mergebench.util.errors import MergeBenchError

HEAD = [r"classifier\..*"]
TASKS = ("a", "b")
SCRIPT = Path(sys.executable).parent / "mergebench-merge"


def _config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """base/ (a `BertModel`) and a/, b/ (`BertForSequenceClassification` fine-tunes of it
    with perturbed weights, 2 and 3 labels), as `save_pretrained` writes them."""
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    base = BertModel(_config())
    base.save_pretrained(root / "base")
    for index, task in enumerate(TASKS):
        config = _config()
        config.num_labels = 2 + index
        model = BertForSequenceClassification(config)
        model.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in model.bert.parameters():
                param.add_(0.01 * torch.randn_like(param))
        model.save_pretrained(root / task)
    return root


def _states(hub: Path) -> tuple[dict, dict]:
    pre = load_file(hub / "base" / "model.safetensors")
    finetuned = {t: load_file(hub / t / "model.safetensors") for t in TASKS}
    return pre, finetuned


def _renamed_by_hand(finetuned: dict) -> dict:
    return {
        t: {k.removeprefix("bert."): v for k, v in state.items()} for t, state in finetuned.items()
    }


def _equal(left: dict, right: dict) -> None:
    assert set(left) == set(right)
    for key, value in right.items():
        assert torch.equal(left[key], value), key


def test_hub_checkpoints_carry_the_prefix(hub):
    pre, finetuned = _states(hub)
    assert "embeddings.word_embeddings.weight" in pre
    assert "bert.embeddings.word_embeddings.weight" in finetuned["a"]
    assert "classifier.weight" in finetuned["a"]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "emr", "weight_averaging"])
def test_detected_prefix_merges_like_renamed_state_dicts(hub, method, capsys):
    pre, finetuned = _states(hub)
    paths = {t: hub / t for t in TASKS}
    result = mergebench.merge(method, hub / "base", paths, exclude=HEAD)
    expected = mergebench.merge(
        method, pre, _renamed_by_hand(finetuned), exclude=HEAD, progress=False
    )
    tasks = [None] if result.kind == "single" else list(TASKS)
    for task in [*tasks, *(TASKS if result.kind == "single" else ())]:
        _equal(result.state_dict(task), expected.state_dict(task))
    # Named as the pretrained checkpoint is; each task keeps its own head.
    assert "embeddings.word_embeddings.weight" in result.state_dict(*tasks[:1])
    if result.kind != "single":
        assert result.state_dict("b")["classifier.weight"].shape[0] == 3
    record = {"rules": {"bert.": ""}, "how": "detected"}
    assert result.extra["key_alignment"] == {"a": record, "b": record}
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "key names" in line]
    assert lines == [
        "mergebench: key names of a, b renamed 'bert.' -> '' (detected); the result's keys "
        f"are named as in pretrained ({hub / 'base' / 'model.safetensors'})"
    ]


def test_saved_result_records_the_mapping_and_reloads(hub, tmp_path):
    out = tmp_path / "out"
    result = mergebench.merge(
        "emr", hub / "base", {t: hub / t for t in TASKS}, exclude=HEAD, output_dir=out,
        progress=False,
    )  # fmt: skip
    meta = json.loads((out / "result.json").read_text())
    assert meta["extra"]["key_alignment"]["a"] == {"rules": {"bert.": ""}, "how": "detected"}
    # The pretrained model was not renamed: the result refers to its file, and reloads.
    assert meta["pretrained"]["files"] == [str((hub / "base" / "model.safetensors").resolve())]
    loaded = mergebench.load_result(out)
    _equal(loaded.state_dict("a"), result.state_dict("a"))


def test_the_reverse_prefix_is_added(hub):
    """A pretrained model saved with the prefix, fine-tunes saved bare."""
    pre, finetuned = _states(hub)
    pre_prefixed = {f"bert.{k}": v for k, v in pre.items()}
    bare = {t: {k: v for k, v in s.items() if k.startswith("bert.")} for t, s in finetuned.items()}
    bare = _renamed_by_hand(bare)
    result = mergebench.merge("task_arithmetic", pre_prefixed, bare, progress=False)
    assert result.extra["key_alignment"]["a"] == {"rules": {"": "bert."}, "how": "detected"}
    expected = mergebench.merge(
        "task_arithmetic", pre_prefixed,
        {t: {f"bert.{k}": v for k, v in s.items()} for t, s in bare.items()}, progress=False,
    )  # fmt: skip
    _equal(result.state_dict(), expected.state_dict())


def test_matching_keys_are_not_renamed(tiny_models):
    pre, finetuned = tiny_models
    pool = ModelPool.from_checkpoints(pre, finetuned, exclude=HEAD)
    assert pool.key_alignment == {}
    result = mergebench.merge("ties", pre, finetuned, exclude=HEAD, progress=False)
    assert "key_alignment" not in result.extra


def test_the_head_without_exclude_keeps_the_exclude_hint(hub):
    with pytest.raises(MergeBenchError) as err:
        mergebench.merge("ties", hub / "base", {t: hub / t for t in TASKS}, progress=False)
    message = str(err.value)
    assert "key 'classifier.bias' is not in pretrained" in message
    assert r"exclude=['classifier\\..*']" in message
    assert "\n" not in message


def test_two_prefixes_that_fit_are_refused():
    w = torch.ones(2)
    pre = {"w": w, "v": w}
    ft = {"x.w": w, "x.v": w, "y.w": w, "y.v": w}
    with pytest.raises(MergeBenchError) as err:
        mergebench.merge("ties", pre, {"a": ft}, progress=False)
    assert str(err.value) == (
        "finetuned[a] (in-memory state dict): its keys match pretrained (in-memory state dict) "
        "under two prefixes, strip_prefix='x.' (strip 'x.') and strip_prefix='y.' (strip 'y.'); "
        "give the one you mean"
    )
    result = mergebench.merge("ties", pre, {"a": ft}, strip_prefix="y.", exclude=[r"x\..*"],
                              heads_separate=True, progress=False)  # fmt: skip
    assert result.extra["key_alignment"] == {"a": {"rules": {"y.": ""}, "how": "strip_prefix"}}


def test_a_prefix_that_matches_only_some_keys_is_refused(hub):
    pre, finetuned = _states(hub)
    del finetuned["b"]["bert.pooler.dense.weight"]
    with pytest.raises(MergeBenchError) as err:
        mergebench.merge("ties", pre, finetuned, exclude=HEAD, progress=False)
    assert str(err.value) == (
        "finetuned[b] (in-memory state dict) keys carry the prefix 'bert.' that pretrained "
        "(in-memory state dict) lacks (task 'b'), but even with it 1 key of pretrained "
        "(in-memory state dict) not in finetuned[b] (in-memory state dict) "
        "('pooler.dense.weight'); name the renaming with key_map=..., or exclude them if they "
        "are heads"
    )


def test_a_head_only_the_pretrained_model_has_is_named(hub):
    """A base saved with its pre-training head (`cls.*`), which the fine-tunes lack."""
    pre, finetuned = _states(hub)
    pre["cls.predictions.bias"] = torch.zeros(64)
    with pytest.raises(MergeBenchError) as err:
        mergebench.merge("ties", pre, finetuned, exclude=HEAD, progress=False)
    assert str(err.value) == (
        "finetuned[a] (in-memory state dict) keys carry the prefix 'bert.' that pretrained "
        "(in-memory state dict) lacks (task 'a'), but even with it 1 key of pretrained "
        "(in-memory state dict) not in finetuned[a] (in-memory state dict) "
        "('cls.predictions.bias'); if they are a head the fine-tuned models do not use, "
        r"exclude them (exclude=['cls\\..*'], heads_separate=true)"
    )
    result = mergebench.merge("ties", pre, finetuned, exclude=[*HEAD, r"cls\..*"],
                              heads_separate=True, progress=False)  # fmt: skip
    assert result.extra["key_alignment"]["a"]["rules"] == {"bert.": ""}


def test_unrelated_keys_say_what_differs(tiny_models):
    pre, finetuned = tiny_models
    finetuned["a"] = {k.replace("layer.", "block."): v for k, v in finetuned["a"].items()}
    finetuned["a"]["out.extra"] = torch.zeros(1)
    with pytest.raises(MergeBenchError) as err:
        mergebench.merge("ties", pre, finetuned, exclude=HEAD, progress=False)
    assert str(err.value) == (
        "finetuned[a] (in-memory state dict) (task 'a'): 2 keys of pretrained (in-memory state "
        "dict) are not in it, e.g. 'layer.weight', 'layer.bias'; 3 of its keys are not in "
        "pretrained (in-memory state dict), e.g. 'block.weight', 'block.bias', "
        "'out.extra'"
    )


def test_key_map_prefix_and_regex_rename_like_by_hand(hub):
    pre, finetuned = _states(hub)
    expected = mergebench.merge("ties", pre, _renamed_by_hand(finetuned), exclude=HEAD,
                                progress=False)  # fmt: skip
    for key_map in ({"bert.": ""}, {r"^bert\.(.*)$": r"\1"}, {t: {"bert.": ""} for t in TASKS}):
        result = mergebench.merge("ties", pre, finetuned, exclude=HEAD, key_map=key_map,
                                  progress=False)  # fmt: skip
        _equal(result.state_dict(), expected.state_dict())
        assert result.extra["key_alignment"]["b"]["how"] == "key_map"


def test_strip_prefix_per_checkpoint_and_for_the_pretrained(hub):
    pre, finetuned = _states(hub)
    expected = mergebench.merge("ties", pre, _renamed_by_hand(finetuned), exclude=HEAD,
                                progress=False)  # fmt: skip
    result = mergebench.merge("ties", pre, finetuned, exclude=HEAD, progress=False,
                              strip_prefix={"a": "bert", "b": "bert."})  # fmt: skip
    _equal(result.state_dict(), expected.state_dict())
    # The pretrained model renamed instead: the result is named as the renamed pretrained.
    pre_prefixed = {f"model.{k}": v for k, v in pre.items()}
    result = mergebench.merge("ties", pre_prefixed, finetuned, exclude=HEAD, progress=False,
                              strip_prefix={"pretrained": "model."})  # fmt: skip
    _equal(result.state_dict(), expected.state_dict())
    assert result.extra["key_alignment"] == {
        "pretrained": {"rules": {"model.": ""}, "how": "strip_prefix"},
        "a": {"rules": {"bert.": ""}, "how": "detected"},
        "b": {"rules": {"bert.": ""}, "how": "detected"},
    }


def test_a_task_named_pretrained_is_refused_only_where_ambiguous(hub):
    pre, finetuned = _states(hub)
    finetuned = {"pretrained": finetuned["a"]}
    with pytest.raises(MergeBenchError, match="a task named 'pretrained' cannot be told apart"):
        mergebench.merge("ties", pre, finetuned, exclude=HEAD, progress=False,
                         strip_prefix={"pretrained": "bert."})  # fmt: skip
    result = mergebench.merge("ties", pre, finetuned, exclude=HEAD, progress=False,
                              strip_prefix="bert.")  # fmt: skip
    assert result.extra["key_alignment"] == {
        "pretrained": {"rules": {"bert.": ""}, "how": "strip_prefix"}
    }


def test_an_empty_key_map_turns_detection_off(hub):
    pre, finetuned = _states(hub)
    with pytest.raises(MergeBenchError, match=r"rerun with strip_prefix='bert\.'"):
        mergebench.merge("ties", pre, finetuned, exclude=HEAD, key_map={"a": {}, "b": {}},
                         progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"strip_prefix": "encoder."},
            "strip_prefix: no key of finetuned[a] (in-memory state dict) starts with 'encoder.' "
            "(its keys start with 'bert.', 'classifier.'), so nothing would be stripped",
        ),
        ({"strip_prefix": 3}, "strip_prefix: expected a key prefix like 'bert.' for a, got 3"),
        ({"strip_prefix": ""}, "strip_prefix: expected a key prefix like 'bert.' for a, got ''"),
        (
            {"strip_prefix": {"c": "bert."}},
            "strip_prefix: 'c' is not a checkpoint of this merge (use pretrained or a task: a, b)",
        ),
        (
            {"key_map": "bert."},
            "key_map: expected a mapping like {'bert.': ''} or {task: {'bert.': ''}}, got 'bert.'",
        ),
        (
            {"key_map": {"a": {"bert.": ""}, "b": "x"}},
            "key_map.b: expected a mapping {from: to}, got 'x' (give rules for every checkpoint, "
            "or one map for all)",
        ),
        (
            {"key_map": {"^bert(": ""}},
            "key_map (a): invalid regex '^bert(' (missing ), unterminated subpattern at position 5)",
        ),
        (
            {"key_map": {"bert.": 1}},
            "key_map (a): rules map a key prefix or ^regex to a string, got 'bert.': 1",
        ),
        (
            {"key_map": {"nothing.": ""}},
            "key_map: rule 'nothing.' -> '' matches no key of any fine-tuned model (first keys: "
            "'bert.embeddings.LayerNorm.bias', 'bert.embeddings.LayerNorm.weight', "
            "'bert.embeddings.position_embeddings.weight', ...)",
        ),
        (
            {"key_map": {"bert.": "", "bert.encoder.": ""}},
            "key_map: rule 'bert.encoder.' -> '' matches no key of any fine-tuned model (first "
            "keys: 'bert.embeddings.LayerNorm.bias', 'bert.embeddings.LayerNorm.weight', "
            "'bert.embeddings.position_embeddings.weight', ...)",
        ),
        (
            {"key_map": {"bert.": "", "classifier.": ""}},
            "key_map: finetuned[a] (in-memory state dict) keys 'classifier.bias' and 'bert.bias' "
            "would both be named 'bias'",
        ),
        (
            {"key_map": {"a": {"bert.": ""}}, "strip_prefix": "bert."},
            "key_map and strip_prefix both rename a: give one of them",
        ),
    ],
)
def test_bad_options_are_one_line_errors(hub, options, message):
    pre, finetuned = _states(hub)
    if "classifier." in str(options.get("key_map")):
        finetuned["a"]["bert.bias"] = torch.zeros(1)  # `bias` twice after the renaming
    with pytest.raises(MergeBenchError) as err:
        mergebench.merge("ties", pre, finetuned, exclude=HEAD, progress=False, **options)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------ the CLI


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)  # fmt: skip


def test_cli_merges_hub_folders_and_takes_the_options(hub, tmp_path):
    pre, finetuned = _states(hub)
    expected = mergebench.merge("ties", pre, _renamed_by_hand(finetuned), exclude=HEAD,
                                progress=False)  # fmt: skip
    common = ["method=ties", f"pretrained={hub / 'base'}",
              f"finetuned={{a: {hub / 'a'}, b: {hub / 'b'}}}", r"exclude=[classifier\..*]"]  # fmt: skip
    runs = {
        "detected": ([], "detected"),
        "strip": (["strip_prefix=bert."], "strip_prefix"),
        "per_task": (["strip_prefix={a: bert., b: bert.}"], "strip_prefix"),
        "key_map": (["key_map={bert.: ''}"], "key_map"),
    }
    for name, (extra, how) in runs.items():
        proc = _cli(tmp_path, *common, *extra, f"output_dir=out_{name}")
        assert proc.returncode == 0, (name, proc.stderr)
        loaded = mergebench.load_result(tmp_path / f"out_{name}")
        _equal(loaded.state_dict(), expected.state_dict())
        assert loaded.extra["key_alignment"]["a"]["how"] == how, name
        assert f"key names of a, b renamed 'bert.' -> '' ({how})" in proc.stderr, name
    proc = _cli(tmp_path, *common, "strip_prefix=encoder.", "output_dir=bad")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("mergebench-merge: error: strip_prefix: no key of finetuned[a]")
    )
    assert not (tmp_path / "bad").exists()
