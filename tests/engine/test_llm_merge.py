"""Causal LM checkpoints (tiny Llama, Gemma 2, Qwen2, Mistral written by `save_pretrained`)
through `mergebench.merge`: every data-free method, tied embeddings, the output dtype, and
the vocabulary policies (`engine/llm.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_llm import VOCAB, make_llm

import mergebench
from mergebench.engine.checkpoints import open_checkpoint
from mergebench.engine.views import RowsView
from mergebench.methods.registry import method_class, method_names
from mergebench.util.errors import MergeBenchError

pytest.importorskip("transformers")

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
DATA_FREE = [n for n in method_names() if not method_class(n).needs_data]
# The pools: tied or not, one safetensors file or shards.
SETUPS = {"llama": (False, "20KB"), "gemma2": (True, None), "qwen2": (True, "20KB"),
          "mistral": (False, None)}  # fmt: skip


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return open_checkpoint(folder).state_dict()


def _average(base: Path, experts: list[Path], key: str) -> torch.Tensor:
    """weight_averaging by hand, in float32: `pre + (sum_t (W_t - pre)) / N`."""
    pre = _state(base)[key].float()
    taus = [_state(e)[key].float() - pre for e in experts]
    total = taus[0]
    for tau in taus[1:]:
        total = total + tau
    return pre + total / len(taus)


@pytest.fixture(scope="module", params=list(SETUPS))
def arch_pool(request, tmp_path_factory):
    arch = request.param
    tie, shard = SETUPS[arch]
    root = tmp_path_factory.mktemp(arch)
    base = make_llm(root / "base", arch, seed=0, tie=tie, shard=shard)
    experts = {t: make_llm(root / t, arch, seed=i + 1, tie=tie, shard=shard, like=base)
               for i, t in enumerate(("a", "b"))}  # fmt: skip
    return arch, tie, base, experts


def test_every_data_free_method_merges_each_architecture(arch_pool):
    arch, tie, base, experts = arch_pool
    stored = open_checkpoint(base)
    assert (HEAD in stored.keys()) is not tie  # save_pretrained stores a tied head once
    for name in DATA_FREE:
        options = {"layer_pattern": r"model\.layers\.(\d+)\..*"} if name == "lines" else {}
        result = mergebench.merge(name, base, experts, progress=False, **options)
        state = result.state_dict("a")
        assert sorted(state) == sorted(stored.keys()), name  # what the base stores, once
        for key, tensor in state.items():
            assert tensor.dtype == torch.bfloat16, (name, key)  # bf16 stays bf16
            assert tensor.shape == stored.shape(key)
        assert not torch.equal(state[EMBED], stored.get(EMBED)), name  # embeddings merged
        if not tie:
            assert not torch.equal(state[HEAD], stored.get(HEAD)), name
    averaged = mergebench.merge("weight_averaging", base, experts, progress=False).state_dict()
    for key in [EMBED] if tie else [EMBED, HEAD]:  # float32 arithmetic, one rounding at the end
        want = _average(base, list(experts.values()), key).to(torch.bfloat16)
        assert torch.equal(averaged[key], want), (arch, key)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    base = make_llm(root / "base", "llama", seed=0, tie=True)
    experts = {t: make_llm(root / t, "llama", seed=i + 1, tie=True, like=base)
               for i, t in enumerate(("a", "b"))}  # fmt: skip
    untied = make_llm(root / "untied", "llama", seed=5, tie=False)
    return base, experts, untied


def _shared_state(folder: Path) -> dict[str, torch.Tensor]:
    """A tied model's `state_dict()`: both keys, one storage (as `.bin` files hold them)."""
    state = _state(folder)
    state[HEAD] = state[EMBED]
    return state


def test_tied_base_storing_both_keys_merges_them_once(tied_llama):
    base, experts, _ = tied_llama
    pre = _shared_state(base)
    finetuned = {t: _shared_state(p) for t, p in experts.items()}
    # DARE draws per key: a pair merged twice would come out untied.
    result = mergebench.merge("dare", pre, finetuned, progress=False, drop=0.5, seed=3)
    state = result.state_dict("a")
    assert sorted(state) == sorted(pre)
    assert torch.equal(state[HEAD], state[EMBED])
    assert result.extra["tied_keys"] == {HEAD: EMBED}
    files_only = mergebench.merge("dare", base, experts, progress=False, drop=0.5, seed=3)
    assert torch.equal(files_only.state_dict("a")[EMBED], state[EMBED])  # the same merge
    assert HEAD not in files_only.state_dict("a")  # the base stores one key: so does the result


def test_tied_expert_storing_both_keys_of_a_single_key_base(tied_llama, tmp_path):
    base, experts, _ = tied_llama
    finetuned = {"a": _shared_state(experts["a"]), "b": experts["b"]}
    result = mergebench.merge("weight_averaging", base, finetuned, progress=False,
                              output_dir=tmp_path / "r")  # fmt: skip
    state = result.state_dict()
    assert HEAD not in state
    assert torch.equal(state[EMBED], _average(base, list(experts.values()), EMBED).bfloat16())


def test_untied_expert_of_a_tied_base_is_refused(tied_llama):
    base, experts, untied = tied_llama
    with pytest.raises(MergeBenchError) as err:
        mergebench.merge("ties", base, {"a": experts["a"], "u": untied}, progress=False)
    assert "finetuned[u]" in str(err.value) and "untied" in str(err.value)
    assert "\n" not in str(err.value)


def test_tied_expert_of_an_untied_base_serves_its_embedding(tied_llama, tmp_path):
    _, experts, untied = tied_llama
    result = mergebench.merge("weight_averaging", untied, {"a": experts["a"]}, progress=False)
    pre = _state(untied)
    want = pre[HEAD].float() + (_state(experts["a"])[EMBED].float() - pre[HEAD].float()) / 1
    assert torch.equal(result.state_dict()[HEAD], want.bfloat16())


def test_out_dtype_chooses_the_merged_dtype(tied_llama, tmp_path):
    base, experts, _ = tied_llama
    result = mergebench.merge("weight_averaging", base, experts, progress=False,
                              out_dtype="float32", output_dir=tmp_path / "r")  # fmt: skip
    state = result.state_dict()
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert torch.equal(state[EMBED], _average(base, list(experts.values()), EMBED))  # unrounded
    assert result.extra["out_dtype"] == "float32"
    emr = mergebench.merge("emr", base, experts, progress=False, out_dtype="float16")
    assert emr.extra["out_dtype"] == "float16"  # applied where the model is written out
    with pytest.raises(MergeBenchError, match=r"^out_dtype: 'int8' is not an output dtype"):
        mergebench.merge("ties", base, experts, progress=False, out_dtype="int8")


# -- vocabulary ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    base = make_llm(root / "base", "llama", seed=0, shard="20KB")
    four = make_llm(root / "four", "llama", seed=1, like=base, shard="20KB",
                    extra_tokens=["x1", "x2", "x3", "x4"])  # fmt: skip
    two = make_llm(root / "two", "llama", seed=2, like=base, extra_tokens=["x1", "x2"])
    other = make_llm(root / "other", "llama", seed=3, like=base, extra_tokens=["y1", "y2"])
    plain = make_llm(root / "plain", "llama", seed=4, like=base)
    return root, base, four, two, other, plain


def test_vocab_base_drops_extra_rows_and_says_so(vocab_pool, capsys):
    _, base, four, _, _, plain = vocab_pool
    result = mergebench.merge("ties", base, {"four": four, "plain": plain}, progress=True)
    assert "four" in capsys.readouterr().err.split("vocab: base:")[1]
    assert result.extra["vocab"]["dropped_rows"] == {"four": 4}
    cut = {k: v[:VOCAB] if k in (EMBED, HEAD) else v for k, v in _state(four).items()}
    by_hand = mergebench.merge("ties", base, {"four": cut, "plain": plain}, progress=False)
    state = result.state_dict()
    assert state[EMBED].shape[0] == VOCAB
    for key, tensor in by_hand.state_dict().items():
        assert torch.equal(state[key], tensor), key


def test_vocab_view_reads_only_the_base_rows(vocab_pool):
    _, _, four, *_ = vocab_pool
    source = open_checkpoint(four)

    def whole(key: str) -> torch.Tensor:
        raise AssertionError(f"read the whole of {key}")

    view = RowsView(source, {EMBED: (VOCAB, VOCAB)})
    want = source.get(EMBED)[:VOCAB].float()
    source.get = whole  # the view must read rows, never the whole matrix
    out = torch.empty(VOCAB, 32)
    view.read_into(EMBED, out)
    assert torch.equal(out, want)
    rows = torch.empty(3, 32, dtype=torch.bfloat16)
    source.read_rows_into(EMBED, rows, start=VOCAB + 1)
    assert torch.equal(
        rows.float(), open_checkpoint(four).get(EMBED)[VOCAB + 1 : VOCAB + 4].float()
    )


def test_vocab_union_keeps_every_row(vocab_pool):
    _, base, four, two, _, plain = vocab_pool
    experts = {"two": two, "four": four, "plain": plain}
    result = mergebench.merge("emr", base, experts, progress=False, vocab="union")
    info = result.extra["vocab"]
    assert info["tokenizer"] == "four" and info["extra_rows"] == {"four": 4, "two": 2}
    for task in result.tasks:
        state = result.state_dict(task)
        for key in (EMBED, HEAD):
            rows_four, rows_two = _state(four)[key].float(), _state(two)[key].float()
            assert state[key].shape[0] == VOCAB + 4
            mean = (rows_four[VOCAB : VOCAB + 2] + rows_two[VOCAB : VOCAB + 2]) / 2
            assert torch.equal(state[key][VOCAB : VOCAB + 2], mean.bfloat16())
            assert torch.equal(state[key][VOCAB + 2 :], rows_four[VOCAB + 2 :].bfloat16())


def test_vocab_union_refuses_two_tokens_for_one_row(vocab_pool):
    _, base, four, _, other, _ = vocab_pool
    with pytest.raises(MergeBenchError) as err:
        mergebench.merge("ties", base, {"four": four, "other": other}, progress=False,
                         vocab="union")  # fmt: skip
    assert str(err.value).startswith(f"vocab: union: row {VOCAB} is token 'x1' in finetuned[four]")
    assert "'y1' in finetuned[other]" in str(err.value)


def test_expert_with_fewer_rows_than_the_base_is_refused(vocab_pool):
    _, base, four, *_ = vocab_pool
    with pytest.raises(MergeBenchError) as err:
        mergebench.merge("ties", four, {"base": base}, progress=False)
    message = str(err.value)
    assert message.startswith("finetuned[base] (") and f"has {VOCAB} rows" in message
    assert f"{VOCAB + 4}; an expert with fewer rows cannot be merged" in message


def test_bad_vocab_policy(vocab_pool):
    _, base, four, *_ = vocab_pool
    with pytest.raises(MergeBenchError, match=r"^vocab: 'both' is not a vocabulary policy"):
        mergebench.merge("ties", base, {"four": four}, progress=False, vocab="both")


# -- the command line ----------------------------------------------------------------------
def _merge_cli(cwd, capsys, monkeypatch, *args) -> tuple[int, str]:
    from mergebench.cli.merge import main as merge_main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["mergebench-merge", *args])
    code = 0
    try:
        merge_main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def test_cli_vocab_and_out_dtype(vocab_pool, tmp_path, capsys, monkeypatch):
    root, base, four, two, _, _ = vocab_pool
    finetuned = f"finetuned={{four: {four}, two: {two}}}"
    code, err = _merge_cli(tmp_path, capsys, monkeypatch, "method=ties", f"pretrained={base}",
                           finetuned, "output_dir=out", "vocab=union", "out_dtype=float32")  # fmt: skip
    assert code == 0, err
    result = mergebench.load_result(tmp_path / "out")
    assert result.extra["vocab"]["rows"] == {EMBED: VOCAB + 4, HEAD: VOCAB + 4}
    assert result.state_dict()[EMBED].dtype == torch.float32
    for option, words in (("out_dtype=int8", "out_dtype: 'int8' is not an output dtype"),
                          ("vocab=all", "vocab: 'all' is not a vocabulary policy")):  # fmt: skip
        code, err = _merge_cli(tmp_path, capsys, monkeypatch, "method=ties", f"pretrained={base}",
                               finetuned, "output_dir=bad", option)  # fmt: skip
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"mergebench-merge: error: {words}")
        assert not (tmp_path / "bad").exists()
