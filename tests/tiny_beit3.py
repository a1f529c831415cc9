"""A tiny BEiT-3 world in the real setting's formats: a sentencepiece model read as XLM-R
reads it, unilm index files for the five tasks with small PNG images, a COCO-format
captioning ground truth, VQA's answer2label.txt, and `.pth` checkpoints holding
{"model": state dict}: a pretrained backbone and five fine-tunes made by perturbing it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TASKS = ("imagenet", "vqav2", "nlvr2", "coco_captioning", "coco_retrieval")
ARCH = {"embed_dim": 32, "heads": 2, "ffn_dim": 64, "layers": 2, "patch_size": 16}
# Two resolutions, so the position tables of 48-px tasks stay task-specific.
IMG_SIZE = {"imagenet": 32, "vqav2": 48, "nlvr2": 32, "coco_captioning": 48, "coco_retrieval": 32}
WORDS = ["a dog on a red car", "two cats sit on the grass", "is the man riding a horse",
         "a plate of food with a fork", "the sky is blue", "yes", "no", "two", "red"]  # fmt: skip
ANSWERS = ["yes", "no", "2", "red"]
CAPTIONS = {
    11: ["a dog on a red car", "a dog sits on a car", "the red car has a dog"],
    12: ["two cats sit on the grass", "cats on the grass", "two cats in grass"],
    13: ["a plate of food with a fork", "food on a plate", "a fork and a plate of food"],
}


def _jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")


def _images(root: Path, count: int, seed: int = 0) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(exist_ok=True)
    names = []
    for i in range(count):
        name = f"images/img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name)
        names.append(name)
    return names


def _tokenizer(root: Path):
    import sentencepiece as spm

    from mergebench.data.beit3_index import XLMRTokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(WORDS * 20), model_prefix=str(root / "beit3"), vocab_size=40,
        minloglevel=2, hard_vocab_limit=False,
    )  # fmt: skip
    return XLMRTokenizer(root / "beit3.model")


def write_data(root: Path) -> dict:
    """Index files for every task (test split, plus a train split for two of them)."""
    tok = _tokenizer(root)
    ids = lambda text: tok.convert_tokens_to_ids(tok.tokenize(text))  # noqa: E731
    images = _images(root, 6)
    _jsonl(root / "imagenet.val.index.jsonl",
           [{"image_path": images[i], "label": i % 3} for i in range(6)])  # fmt: skip
    _jsonl(root / "imagenet.train.index.jsonl",
           [{"image_path": images[i], "label": (i + 1) % 3} for i in range(4)])  # fmt: skip
    (root / "answer2label.txt").write_text(
        "".join(json.dumps({"answer": a, "label": i}) + "\n" for i, a in enumerate(ANSWERS))
    )
    vqa = []
    for i in range(5):
        answers = ["yes"] * (i + 1) + ["no"] * (9 - i)
        vqa.append({"image_path": images[i], "text_segment": ids("is the man riding a horse"),
                    "labels": [0, 1], "scores": [min(1.0, 0.3 * (i + 1)), 0.9], "qid": i,
                    "answers": answers})  # fmt: skip
    vqa.append({"image_path": images[5], "text_segment": "the sky is blue",
                "labels": [3], "scores": [1.0], "qid": 5})  # fmt: skip
    _jsonl(root / "vqa.rest_val.jsonl", vqa)
    _jsonl(root / "nlvr2.test-P.index.jsonl", [
        {"image_path": images[i], "image2_path": images[(i + 1) % 6],
         "text_segment": ids(WORDS[i]), "label": i % 2, "identifier": f"t-{i}-0"}
        for i in range(6)])  # fmt: skip
    _jsonl(root / "nlvr2.train.index.jsonl", [
        {"image_path": images[i], "image2_path": images[i + 1],
         "text_segment": ids(WORDS[i]), "label": 1, "identifier": f"r-{i}-0"}
        for i in range(3)])  # fmt: skip
    cap_images = dict(zip(CAPTIONS, images[:3], strict=True))
    _jsonl(
        root / "coco_captioning.test.jsonl",
        [{"image_path": p, "text_segment": None, "image_id": i} for i, p in cap_images.items()],
    )
    gt = {"images": [{"id": i} for i in CAPTIONS],
          "annotations": [{"image_id": i, "caption": c, "id": 10 * i + k}
                          for i, caps in CAPTIONS.items() for k, c in enumerate(caps)]}  # fmt: skip
    (root / "coco_karpathy_test_gt.json").write_text(json.dumps(gt))
    _jsonl(root / "coco_retrieval.test.jsonl", [
        {"image_path": images[img], "text_segment": ids(c), "image_id": img}
        for img, caps in enumerate(CAPTIONS.values()) for c in caps])  # fmt: skip
    return {"tokenizer": root / "beit3.model", "vocab_size": tok.vocab_size + 2}


def write_checkpoints(root: Path, vocab_size: int) -> dict[str, Path]:
    """A pretrained backbone and per task a fine-tune: the backbone plus noise, a new head."""
    from mergebench.families.beit3_heads import build_task_model

    arch = {**ARCH, "vocab_size": vocab_size}
    classes = {"imagenet": 3, "vqav2": len(ANSWERS), "nlvr2": 2}
    torch.manual_seed(0)
    base = build_task_model("coco_retrieval", arch, IMG_SIZE["imagenet"], 0).state_dict()
    pretrained = {k: v for k, v in base.items() if k.startswith("beit3.")}
    paths = {"pretrained": root / "beit3_base_patch16_224.pth"}
    torch.save({"model": pretrained}, paths["pretrained"])
    for n, task in enumerate(TASKS):
        gen = torch.Generator().manual_seed(100 + n)
        model = build_task_model(task, arch, IMG_SIZE[task], classes.get(task, 0))
        state = model.state_dict()
        for key, value in state.items():
            if key in pretrained and pretrained[key].shape == value.shape:
                value.copy_(pretrained[key])
            if value.is_floating_point():
                value.add_(0.02 * torch.randn(value.shape, generator=gen))
        paths[task] = root / f"{task}.pth"
        torch.save({"model": state}, paths[task])
    return paths


def world(root: Path) -> dict:
    data = write_data(root)
    return {"root": root, **data, **write_checkpoints(root, data["vocab_size"])}


def overrides(w: dict) -> list[str]:
    """Hydra overrides running model=beit3_base taskset=beit3_5 on the tiny world."""
    arch = (
        "{" + ",".join(f"{k}:{v}" for k, v in {**ARCH, "vocab_size": w["vocab_size"]}.items()) + "}"
    )
    sizes = "{" + ",".join(f"{k}:{v}" for k, v in IMG_SIZE.items()) + "}"
    return [
        "model=beit3_base",
        "taskset=beit3_5",
        f"taskset.root={w['root']}",
        "taskset.classes.imagenet=3",
        f"model.checkpoints.pretrained={w['pretrained']}",
        *(f"model.checkpoints.finetuned.{t}={w[t]}" for t in TASKS),
        f"model.options.tokenizer={w['tokenizer']}",
        f"model.options.arch={arch}",
        f"model.options.img_size={sizes}",
        "model.options.caption_max_len=6",
        "model.options.max_text_len=16",
    ]
