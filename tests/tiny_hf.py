"""Tiny Hugging Face models and data sets, made on the spot in the hub's own formats.

The paper settings load `openai/clip-vit-base-patch32`, `tanganke/clip-vit-base-patch32_*`,
`gpt2`, `tanganke/gpt2_*`, `tanganke/eurosat`, `nyu-mll/glue` ...: folders written by
`save_pretrained` and data sets stored as parquet or with `save_to_disk`. These builders
write the same formats with random weights a few hundred parameters wide, so the real
loading code runs offline in seconds. Tokenizers are byte-level BPE with no merges (every
byte a token), written as the vocab.json / merges.txt files the hub repositories have.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table (the alphabet of byte-level BPE vocabularies)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(printable, codes, strict=True))]


def write_bpe(folder: Path, vocab: dict[str, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


# ------------------------------------------------------------------------------ CLIP


def clip_vocab() -> dict[str, int]:
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return vocab


def make_clip(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A full `CLIPModel` folder (vision + text towers, tokenizer, image processor), like
    openai/clip-vit-base-patch32."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
            pad_token_id=513, **TEXT,
        ),
        vision_config=dict(image_size=image_size, patch_size=8, **TEXT),
        projection_dim=16,
    )  # fmt: skip
    model = CLIPModel(config)
    model.save_pretrained(folder)
    write_bpe(folder, clip_vocab())
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder


def make_clip_vision(pretrained: Path, folder: Path, seed: int, prefixed: bool) -> Path:
    """A fine-tuned `CLIPVisionModel` folder: the pretrained vision tower, perturbed.
    `prefixed=True` writes `vision_model.*` keys (transformers 4, every FusionBench
    checkpoint); False writes what this transformers version's save_pretrained writes."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPVisionModel

    config = CLIPConfig.from_pretrained(pretrained).vision_config
    vision = CLIPVisionModel(config)
    full = load_file(str(pretrained / "model.safetensors"))
    tower = {k[len("vision_model.") :]: v for k, v in full.items() if k.startswith("vision_model.")}
    getattr(vision, "vision_model", vision).load_state_dict(tower, strict=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vision.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    if prefixed:
        folder.mkdir(parents=True, exist_ok=True)
        inner = getattr(vision, "vision_model", vision)
        state = {f"vision_model.{k}": v.contiguous() for k, v in inner.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(folder)
    else:
        vision.save_pretrained(folder)
    return folder


def image_dataset(classes: int, per_class: int, seed: int, gray: bool = False):
    """A `datasets.Dataset` of small images whose colour depends on the class."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(classes):
        for _ in range(per_class):
            base = np.full((20, 20, 3), 255 * label / max(1, classes - 1))
            pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            images.append(image.convert("L") if gray else image)
            labels.append(label)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def save_parquet_repo(folder: Path, splits: dict[str, object], sub: str = "data") -> Path:
    """Splits as parquet files in the hub's layout (`data/train-00000-of-00001.parquet`)."""
    (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, dataset in splits.items():
        dataset.to_parquet(str(folder / sub / f"{name}-00000-of-00001.parquet"))
    return folder


# ------------------------------------------------------------------------------ text


def gpt2_vocab() -> dict[str, int]:
    vocab = {c: i for i, c in enumerate(_byte_chars())}
    vocab["<|endoftext|>"] = 256
    return vocab


def roberta_vocab() -> dict[str, int]:
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: 4 + i for i, c in enumerate(_byte_chars())})
    vocab["<mask>"] = 260
    return vocab


def make_gpt2(folder: Path, seed: int = 0) -> Path:
    """A bare `GPT2Model` folder (keys `h.0...`, as the hub's gpt2) with its tokenizer."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=257, n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=256, eos_token_id=256,
    )  # fmt: skip
    GPT2Model(config).save_pretrained(folder)
    write_bpe(folder, gpt2_vocab())
    return folder


def make_roberta(folder: Path, seed: int = 0) -> Path:
    """A `RobertaForMaskedLM` folder (backbone + LM head, as the hub's roberta-base)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=261, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, **TEXT,
    )  # fmt: skip
    RobertaForMaskedLM(config).save_pretrained(folder)
    write_bpe(folder, roberta_vocab())
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return folder


def make_text_finetuned(
    kind: str, pretrained: Path, folder: Path, num_labels: int, seed: int
) -> Path:
    """A fine-tuned sequence classifier: the pretrained backbone perturbed, a random head."""
    import transformers

    cls = {
        "gpt2": transformers.GPT2ForSequenceClassification,
        "roberta": transformers.RobertaForSequenceClassification,
    }[kind]
    config = transformers.AutoConfig.from_pretrained(pretrained, num_labels=num_labels)
    if kind == "gpt2":
        config.pad_token_id = config.eos_token_id
    torch.manual_seed(seed)
    model = cls.from_pretrained(pretrained, config=config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "log",
    "big",
    "small",
    "red",
    "blue",
]


def glue_dataset(columns: list[str], n: int, seed: int, num_classes: int | None):
    """Random sentences (pairs) with ClassLabel labels, or float scores (num_classes=None)."""
    import datasets

    rng = np.random.default_rng(seed)
    data = {
        c: [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n)] for c in columns
    }
    feats = {c: datasets.Value("string") for c in columns}
    if num_classes is None:
        data["label"] = rng.uniform(0, 5, n).astype(np.float32).tolist()
        feats["label"] = datasets.Value("float32")
    else:
        data["label"] = (np.arange(n) % num_classes).tolist()
        feats["label"] = datasets.ClassLabel(num_classes=num_classes)
    data["idx"] = list(range(n))
    feats["idx"] = datasets.Value("int32")
    return datasets.Dataset.from_dict(data, features=datasets.Features(feats))


def make_glue_clone(
    root: Path, tasks: dict[str, tuple[list[str], int | None]], n: int = 24
) -> Path:
    """A folder laid out like a clone of nyu-mll/glue: `<root>/<task>/<split>-*.parquet`,
    with a test split whose labels are hidden (-1) as GLUE's are."""
    for index, (task, (columns, classes)) in enumerate(tasks.items()):
        splits = {
            "train": glue_dataset(columns, n, 10 * index, classes),
            "validation": glue_dataset(columns, n // 2, 10 * index + 1, classes),
        }
        test = glue_dataset(columns, 4, 10 * index + 2, classes)
        if classes is not None:
            test = test.map(lambda row: {"label": -1})
        splits["test"] = test
        save_parquet_repo(root, splits, sub=task)
    return root


# ------------------------------------------------------------------------------ one's own


def make_bert(folder: Path, seed: int = 0) -> Path:
    """A bare `BertModel` folder (keys `embeddings.*`, no `bert.` prefix) with a WordPiece
    tokenizer of `WORDS`: a base model as one saves it oneself."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), max_position_embeddings=64, **TEXT)
    BertModel(config).save_pretrained(folder)
    return folder


def make_bert_finetuned(pretrained: Path, folder: Path, labels: list[str] | int, seed: int) -> Path:
    """A `BertForSequenceClassification` fine-tune of `pretrained`: its backbone perturbed,
    a random head; `labels` names the classes (`id2label`) or only counts them."""
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    count = labels if isinstance(labels, int) else len(labels)
    config = AutoConfig.from_pretrained(pretrained, num_labels=count)
    if not isinstance(labels, int):
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(pretrained, config=config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(pretrained).save_pretrained(folder)
    return folder


def own_rows(n: int, seed: int, labels: list) -> list[dict]:
    """Rows of random sentences, `labels` in turn."""
    rng = np.random.default_rng(seed)
    return [
        {
            "text": " ".join(rng.choice(WORDS, size=rng.integers(3, 9))),
            "label": labels[i % len(labels)],
        }
        for i in range(n)
    ]


def write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_own_world(root: Path) -> Path:
    """What a user brings: a base (`base/`), two fine-tunes (`sentiment/` with named labels,
    `topic/` with three unnamed ones), and their data: sentiment as CSV with string labels,
    topic as JSON lines with class ids."""
    base = make_bert(root / "base")
    make_bert_finetuned(base, root / "sentiment", ["negative", "positive"], seed=1)
    make_bert_finetuned(base, root / "topic", 3, seed=2)
    # "positive" first: ids must follow the model's id2label, not the data's order
    write_csv(root / "data/sentiment_train.csv", own_rows(30, 0, ["positive", "negative"]))
    write_csv(root / "data/sentiment_test.csv", own_rows(12, 1, ["negative", "positive"]))
    write_jsonl(root / "data/topic_train.jsonl", own_rows(30, 2, [0, 1, 2]))
    write_jsonl(root / "data/topic_test.jsonl", own_rows(9, 3, [2, 1, 0]))
    return root
