"""Tiny random causal language models, written by `save_pretrained` as the hub's LLM
experts are (config.json, safetensors single or sharded, a fast tokenizer), made on the
spot: 2 layers, hidden size 32, a vocabulary of 96 word-level tokens."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
ARCHS = ("llama", "gemma2", "qwen2", "mistral")


def config(arch: str, tie: bool = False, vocab: int = VOCAB):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    kind = {"llama": LlamaConfig, "gemma2": Gemma2Config, "qwen2": Qwen2Config,
            "mistral": MistralConfig}[arch]  # fmt: skip
    return kind(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=vocab, max_position_embeddings=64,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip


def tokenizer(extra_tokens: list[str] | None = None, arch: str = "llama"):
    """A word-level fast tokenizer of `VOCAB` tokens (`w0` ... ; 0-2 special), plus
    `extra_tokens` as added tokens (ids from `VOCAB` on). Qwen2's: byte-level BPE over
    single characters (transformers loads any Qwen2 tokenizer as its own byte-level
    `Qwen2Tokenizer`, which splits `w12` into `w`, `1`, `2`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    if arch == "qwen2":
        chars = ["\u0120", *"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]
        vocab.update({c: i for i, c in enumerate(chars, start=4)})
        vocab.update({f"<x{i}>": i for i in range(len(vocab), VOCAB)})
        core = Tokenizer(models.BPE(vocab, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
    else:
        vocab.update({f"w{i}": i for i in range(4, VOCAB)})
        core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")  # fmt: skip
    if extra_tokens:
        tok.add_tokens(extra_tokens)
    return tok


def make_llm(
    folder: Path,
    arch: str = "llama",
    seed: int = 0,
    tie: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    shard: str | None = None,
    extra_tokens: list[str] | None = None,
    like: Path | None = None,
    noise: float = 0.02,
) -> Path:
    """A `save_pretrained` folder. With `like`, the weights are those of `like` plus
    seeded noise (an expert fine-tuned from that base), rows added for `extra_tokens`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch, tie))
    if like is not None:
        base = AutoModelForCausalLM.from_pretrained(like, dtype=torch.float32)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in model.parameters():
                param.add_(noise * torch.randn_like(param))
    tok = tokenizer(extra_tokens, arch)
    if extra_tokens:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():  # rows of their own, seeded
            emb = model.get_input_embeddings().weight
            emb[VOCAB:] = torch.randn_like(emb[VOCAB:])
            if not tie:
                head = model.get_output_embeddings().weight
                head[VOCAB:] = torch.randn_like(head[VOCAB:])
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    tok.save_pretrained(folder)
    return folder


def llm_pool(root: Path, arch: str = "llama", tasks: tuple[str, ...] = ("a", "b"), **kw):
    """A base and one expert per task (seeds 1, 2, ...)."""
    base = make_llm(root / "base", arch, seed=0, **kw)
    experts = {
        t: make_llm(root / t, arch, seed=i + 1, like=base, **kw) for i, t in enumerate(tasks)
    }
    return base, experts


# -- local lm-eval tasks ------------------------------------------------------------------------
MC_TASK, GEN_TASK = "tiny_mc", "tiny_gen"


def lm_eval_tasks(folder: Path, examples: int = 12, seed: int = 0) -> Path:
    """Two lm-eval tasks over the tiny tokenizer's words, as task YAMLs beside JSON data files
    (the form `--include_path` reads): `tiny_mc` (multiple_choice, acc) and `tiny_gen`
    (generate_until, exact_match). Returns the folder."""
    import json
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(4, VOCAB)}" for _ in range(n))

    mc = [{"question": words(3), "choices": [words(1) for _ in range(3)],
           "answer": rng.randrange(3)} for _ in range(examples)]  # fmt: skip
    gen = [{"prompt": words(3), "answer": words(1)} for _ in range(examples)]
    for name, rows in ((MC_TASK, mc), (GEN_TASK, gen)):
        (folder / f"{name}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = (
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    )
    (folder / f"{MC_TASK}.yaml").write_text(
        f"task: {MC_TASK}\n" + data.format(path=folder / f"{MC_TASK}.json")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )  # fmt: skip
    (folder / f"{GEN_TASK}.yaml").write_text(
        f"task: {GEN_TASK}\n" + data.format(path=folder / f"{GEN_TASK}.json")
        + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['</s>']\n  max_gen_toks: 2\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    ignore_case: true\n    ignore_punctuation: true\n"
    )  # fmt: skip
    return folder


def mergekit_llama_pool(folder: Path) -> dict[str, Path]:
    """A base and three experts (`a`, `b`, `c`): save_pretrained folders of a 2-layer random
    Llama, as the mergekit parity tests merge them with both tools."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    paths = {"base": folder / "base"}
    base.save_pretrained(paths["base"])
    g = torch.Generator().manual_seed(1)
    for index, name in enumerate(("a", "b", "c")):
        state = {
            k: v + (0.02 + 0.05 * index) * torch.randn(v.shape, generator=g)
            for k, v in base.state_dict().items()
        }
        expert = LlamaForCausalLM(config)
        expert.load_state_dict(state)
        paths[name] = folder / name
        expert.save_pretrained(paths[name])
    return paths
