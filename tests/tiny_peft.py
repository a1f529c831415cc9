"""A tiny T5 with its tokenizer, peft (IA)3 and LoRA adapters, and T0-style data sets, made on
the spot in the real formats (`save_pretrained`, peft's adapter folders, `save_to_disk`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "big", "red", "yes", "no", "true",
         "false", "neither", "maybe", "question", "does", "this", "imply", "or", "?", ":", '"',
         ".", "-", "_", "replace", "with", "option", "correct", "above", "sentence", "in"]  # fmt: skip


def make_t5(folder: Path, seed: int = 0) -> Path:
    """A `T5ForConditionalGeneration` folder (d_model 16, 2 layers) with a WordLevel
    tokenizer saved as a `PreTrainedTokenizerFast` (pad 0, EOS 1 appended, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: 3 + i for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, kind: str, seed: int, **config) -> Path:
    """A peft adapter folder over `base` (kind "ia3" or "lora") with perturbed weights."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(base)
    if kind == "ia3":
        peft_config = IA3Config(task_type="SEQ_2_SEQ_LM", **config)
    else:
        peft_config = LoraConfig(task_type="SEQ_2_SEQ_LM", **config)
    peft_model = get_peft_model(model, peft_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name or "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(folder)
    return folder


def _sentence(rng) -> str:
    return " ".join(rng.choice(WORDS[:10], size=rng.integers(3, 7)))


def t0_dataset(task: str, n: int, seed: int):
    """Rows in the hub formats: super_glue rte/cb (premise, hypothesis, ClassLabel),
    winogrande (sentence, option1, option2, answer "1"/"2")."""
    import datasets

    rng = np.random.default_rng(seed)
    if task in ("rte", "cb"):
        classes = 2 if task == "rte" else 3
        feats = datasets.Features(
            {
                "premise": datasets.Value("string"),
                "hypothesis": datasets.Value("string"),
                "idx": datasets.Value("int32"),
                "label": datasets.ClassLabel(num_classes=classes),
            }
        )
        data = {
            "premise": [_sentence(rng) for _ in range(n)],
            "hypothesis": [_sentence(rng) for _ in range(n)],
            "idx": list(range(n)),
            "label": (np.arange(n) % classes).tolist(),
        }
        return datasets.Dataset.from_dict(data, features=feats)
    data = {
        "sentence": [_sentence(rng) + " _ sat" for _ in range(n)],
        "option1": ["cat"] * n,
        "option2": ["dog"] * n,
        "answer": [str(1 + i % 2) for i in range(n)],
    }
    return datasets.Dataset.from_dict(data)


def make_t0_data(root: Path, tasks: list[str], n: int = 12) -> dict[str, Path]:
    """A `save_to_disk` DatasetDict per task (train and validation splits)."""
    import datasets

    folders = {}
    for index, task in enumerate(tasks):
        dd = datasets.DatasetDict(
            {
                "train": t0_dataset(task, n, 10 * index),
                "validation": t0_dataset(task, n // 2, 10 * index + 1),
            }
        )
        folders[task] = root / task
        dd.save_to_disk(str(folders[task]))
    return folders
