"""BEiT-3 task data in unilm's index formats (`beit3/datasets.py`), read from one root folder.

Each split of a task is one or more JSON-lines index files under the root; image paths in
them are relative to the root. What each task's lines hold:

- imagenet (`imagenet.val.index.jsonl`): `image_path`, `label` (class index).
- vqav2 (`vqa.rest_val.jsonl`, ...): `image_path`, `text_segment` (token ids or a string),
  `labels`/`scores` (answer ids with unilm's soft scores), `qid`; optionally `answers`, the
  ten raw human answers, with which the official VQA accuracy is computed. The answer
  vocabulary is `answer2label.txt` (one `{"answer": ..., "label": i}` per line).
- nlvr2 (`nlvr2.dev.index.jsonl`, `nlvr2.test-P.index.jsonl`): `image_path`, `image2_path`,
  `text_segment`, `label` (1 true, 0 false).
- coco_captioning (`coco_captioning.test.jsonl`): `image_path`, `image_id`; references from
  the COCO-format `coco_karpathy_test_gt.json` (`annotations`: `image_id`, `caption`).
- coco_retrieval (`coco_retrieval.test.jsonl`): one line per caption: `image_path`,
  `text_segment`, `image_id` (the image's index in the split).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergebench.util.errors import MergeBenchError

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def read_index(root: Path, files: Sequence[str], where: str) -> list[dict[str, Any]]:
    """The items of one split: the lines of its index files, in order."""
    items: list[dict[str, Any]] = []
    for name in files:
        path = root / name
        if not path.is_file():
            raise MergeBenchError(f"{where}: index file {path} not found")
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as err:
                    raise MergeBenchError(f"{path}:{number}: not JSON ({err.msg})") from None
                if not isinstance(item, dict) or "image_path" not in item:
                    raise MergeBenchError(f"{path}:{number}: an item needs an image_path")
                items.append(item)
    return items


def read_answer_vocab(path: Path) -> list[str]:
    """`answer2label.txt`: answer i on line i."""
    if not path.is_file():
        raise MergeBenchError(f"taskset.root: VQA answer vocabulary {path} not found")
    answers: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            entry = json.loads(line)
            if int(entry.get("label", -1)) != len(answers):
                raise MergeBenchError(f"{path}:{number}: labels must be 0, 1, 2, ... in order")
            answers.append(str(entry["answer"]))
    return answers


def read_caption_references(path: Path) -> dict[int, list[str]]:
    """COCO-format ground truth: image id -> reference captions."""
    if not path.is_file():
        raise MergeBenchError(f"taskset.root: captioning references {path} not found")
    data = json.loads(path.read_text(encoding="utf-8"))
    refs: dict[int, list[str]] = {}
    for ann in data.get("annotations", []):
        refs.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
    return refs


def image_transform(kind: str, size: int) -> Callable[[Any], torch.Tensor]:
    """unilm's evaluation transform: ImageNet resizes the short side and centre-crops with
    ImageNet's mean/std; the other tasks resize to a square with mean/std 0.5 (bicubic)."""
    from torchvision import transforms

    bicubic = transforms.InterpolationMode.BICUBIC
    if kind == "imagenet":
        steps: list[Any] = [transforms.Resize(size, interpolation=bicubic),
                            transforms.CenterCrop(size)]  # fmt: skip
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    else:
        steps = [transforms.Resize((size, size), interpolation=bicubic)]
        mean, std = INCEPTION_MEAN, INCEPTION_STD
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def load_image(root: Path, relative: str) -> Any:
    from PIL import Image

    path = root / relative
    if not path.is_file():
        raise MergeBenchError(f"taskset.root: image {path} not found")
    with Image.open(path) as image:
        return image.convert("RGB")


class TextEncoder:
    """unilm's `_get_text_segment`: [bos] tokens [eos], cut to `max_len`, padded; the padding
    mask is 1 on padding. A string segment is tokenized with the task's tokenizer."""

    def __init__(self, tokenizer: Any, max_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id)
        self.mask = int(tokenizer.mask_token_id)

    def ids(self, segment: Any) -> list[int]:
        if isinstance(segment, str):
            return list(self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(segment)))
        return [int(t) for t in segment]

    def __call__(self, segments: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        rows, masks = [], []
        for segment in segments:
            tokens = self.ids(segment)[: self.max_len - 2]
            tokens = [self.bos, *tokens, self.eos]
            pad = self.max_len - len(tokens)
            rows.append(tokens + [self.pad] * pad)
            masks.append([0] * len(tokens) + [1] * pad)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)


class XLMRTokenizer:
    """XLM-R's tokenizer over a sentencepiece model (`beit3.spm`), as transformers' slow
    `XLMRobertaTokenizer` numbers it: `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, piece i of the
    model at i + 1, `<mask>` last."""

    bos_token_id, pad_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3
    offset = 1

    def __init__(self, path: str | Path) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.mask_token_id = len(self.sp) + self.offset
        self.vocab_size = self.mask_token_id + 1

    def tokenize(self, text: str) -> list[str]:
        return list(self.sp.encode(text, out_type=str))

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        ids = []
        for token in tokens:
            piece = self.sp.piece_to_id(token)
            ids.append(piece + self.offset if piece else self.unk_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids up to the first `</s>`, special tokens left out."""
        pieces = []
        for i in ids:
            if i == self.eos_token_id:
                break
            if i > self.unk_token_id and i < self.mask_token_id:
                pieces.append(int(i) - self.offset)
        return str(self.sp.decode(pieces)).strip()


def load_tokenizer(path: str | Path | None) -> XLMRTokenizer:
    """The XLM-R sentencepiece tokenizer BEiT-3 uses (`beit3.spm`)."""
    if not path:
        raise MergeBenchError("model.options.tokenizer: missing (the path of beit3.spm)")
    spm = Path(str(path)).expanduser()
    if not spm.is_file():
        raise MergeBenchError(f"model.options.tokenizer: {spm} not found")
    try:
        return XLMRTokenizer(spm)
    except (RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MergeBenchError(
            f"model.options.tokenizer: {spm} is not a sentencepiece model ({first})"
        ) from None


def check_fields(items: Sequence[Mapping[str, Any]], fields: Sequence[str], where: str) -> None:
    for number, item in enumerate(items, 1):
        missing = [f for f in fields if f not in item]
        if missing:
            raise MergeBenchError(f"{where}: item {number} lacks {', '.join(missing)}")


__all__ = [
    "TextEncoder",
    "XLMRTokenizer",
    "check_fields",
    "image_transform",
    "load_image",
    "load_tokenizer",
    "read_answer_vocab",
    "read_caption_references",
    "read_index",
]
