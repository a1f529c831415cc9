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


def tokenizer(extra_tokens: list[str] | None = None):
    """A word-level fast tokenizer of `VOCAB` tokens (`w0` ... ; 0-2 special), plus
    `extra_tokens` as added tokens (ids from `VOCAB` on)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
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
    tok = tokenizer(extra_tokens)
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
