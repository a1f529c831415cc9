"""The BEiT-3 family (`model=beit3_base`, `taskset=beit3_5`): EMR-Merging's Table 6 setting,
five BEiT-3 base models fine-tuned on ImageNet-1k, VQAv2, NLVR2, COCO captioning and COCO
retrieval, each with its own head and image resolution.

Models: `mergebench.families.beit3_heads` (torchscale's BEiT-3 under `beit3.*` plus unilm's
heads). Every task has its own architecture, so the evaluator keeps one model per task
(`model_shape`). Which keys merge is `task_specific: auto`'s rule (the official
`merge_beit3`): keys every checkpoint holds with one shape; heads, the output LayerNorm of
three of the tasks and position tables of other resolutions stay each task's own.

Data: unilm's index files under `taskset.root` (`mergebench.data.beit3_index`). The family
holds the inputs without labels; `Beit3Data` (the evaluator's) scores each task as its own
evaluation does (`mergebench.data.vl_metrics`): the primary metric first (ImageNet and NLVR2
accuracy, VQA accuracy, CIDEr, the mean of the six retrieval recalls), then the others.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric

from mergebench.data.beit3_index import (
    TextEncoder,
    check_fields,
    image_transform,
    load_image,
    load_tokenizer,
    read_answer_vocab,
    read_caption_references,
    read_index,
)
from mergebench.data.metrics import ScoredTask, build_metric
from mergebench.data.vl_metrics import caption_scores, retrieval_scores, vqa_accuracy
from mergebench.engine.pool import SPLITS, Batch
from mergebench.families.base import TaskInputs
from mergebench.families.beit3_decoding import CaptionDecoding, Tokens
from mergebench.families.beit3_heads import BASE_ARCH, TASK_KINDS, build_task_model
from mergebench.families.paper import PaperFamily
from mergebench.util.config import to_plain
from mergebench.util.errors import MergeBenchError, construct

# The released checkpoints' resolutions (EMR-Merging's Table 6 models).
DEFAULT_IMG_SIZE = {
    "imagenet": 224,
    "vqav2": 480,
    "nlvr2": 224,
    "coco_captioning": 480,
    "coco_retrieval": 384,
}
PRIMARY = {
    "imagenet": "accuracy",
    "vqav2": "vqa_accuracy",
    "nlvr2": "accuracy",
    "coco_captioning": "cider",
    "coco_retrieval": "recall_mean",
}
# Fields an item holds only for the evaluator (never shown to a method).
LABEL_FIELDS = ("label", "labels", "scores", "answers", "image_id", "qid", "identifier")
HEAD_PATTERNS = (
    r"fc_norm\..*",
    r"head\..*",
    r"pooler\..*",
    r"mlm_head\..*",
    r"language_head\..*",
    r"vision_head\..*",
    r"logit_scale",
)


@dataclass(frozen=True)
class Beit3TaskSpec:
    """Where one task's data lives: index files per split under `root`."""

    task: str
    root: Path
    index: dict[str, tuple[str, ...]]  # split -> index files (reading a split without: error)
    num_classes: int
    answers: tuple[str, ...] = ()  # VQA answer vocabulary
    references: str | None = None  # captioning ground truth file (COCO format)
    max_examples: dict[str, int | None] = field(default_factory=dict)
    files: tuple[str, ...] = ()  # no class names read from files (ConfiguredSource asks)

    @property
    def where(self) -> str:
        return f"taskset.index.{self.task}"

    def items(self, split: str) -> list[dict[str, Any]]:
        files = self.index.get(split, ())
        if not files:
            hint = " (hyperparameter selection reads it: set one, or protocol.select=false)"
            raise MergeBenchError(
                f"{self.where}.{split}: no index file" + (hint if split == "validation" else "")
            )
        items = read_index(self.root, files, f"{self.where}.{split}")
        limit = self.max_examples.get(split)
        return items if limit is None else items[: int(limit)]


class _Rows(Sequence):
    """One split's inputs, read on first use, labels left out; each row names its task."""

    def __init__(self, spec: Beit3TaskSpec, split: str) -> None:
        self.spec, self.split = spec, split
        self._rows: list[dict[str, Any]] | None = None

    def _load(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = [
                {"task": self.spec.task, **{k: v for k, v in it.items() if k not in LABEL_FIELDS}}
                for it in self.spec.items(self.split)
            ]
        return self._rows

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, index):  # type: ignore[override]
        return self._load()[index]


class Beit3Family(PaperFamily):
    name = "beit3"
    kind = "beit3"
    modality = "image_text"
    backbone_prefix = "beit3"
    head_patterns = HEAD_PATTERNS

    def __init__(
        self,
        tasks: dict[str, TaskInputs],
        pretrained_path: Path,
        specs: Mapping[str, Beit3TaskSpec],
        tokenizer: str | None = None,
        arch: Mapping[str, Any] | None = None,
        img_size: Mapping[str, int] | None = None,
        max_text_len: int = 64,
        caption_max_len: int = 64,
        caption_decoding: str = "beam",
        caption_beams: int = 3,
        caption_length_penalty: float = 0.6,
        eval_batch_size: int = 16,
    ) -> None:
        super().__init__(tasks, pretrained_path, {}, eval_batch_size)
        self.specs = dict(specs)  # type: ignore[assignment]
        unknown = set(arch or {}) - set(BASE_ARCH)
        if unknown:
            raise MergeBenchError(
                f"model.options.arch: unknown keys {sorted(unknown)} (known: {list(BASE_ARCH)})"
            )
        self.arch = {**BASE_ARCH, **dict(arch or {})}
        self.img_size = {
            **DEFAULT_IMG_SIZE,
            **{str(k): int(v) for k, v in (img_size or {}).items()},
        }
        self.tokenizer = load_tokenizer(tokenizer)
        if self.tokenizer.vocab_size > int(self.arch["vocab_size"]):
            raise MergeBenchError(
                f"model.options.tokenizer: {self.tokenizer.vocab_size} tokens, more than "
                f"the model's vocab_size {self.arch['vocab_size']}"
            )
        self.text = TextEncoder(self.tokenizer, int(max_text_len))
        self.decoding = CaptionDecoding(
            method=str(caption_decoding),
            num_beams=int(caption_beams),
            length_penalty=float(caption_length_penalty),
            max_len=int(caption_max_len),
        )
        self.transforms = {t: image_transform(t, self.img_size[t]) for t in self.tasks}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        cfg_model: Mapping[str, Any],
        cfg_taskset: Mapping[str, Any],
        seed: int,
        pretrained: Path,
        finetuned: Mapping[str, Path] | None = None,
    ) -> tuple[Beit3Family, Beit3Data]:
        cls.check_taskset(cfg_model, cfg_taskset)
        specs = task_specs(cfg_taskset)
        inputs = {
            t: TaskInputs(spec.num_classes, {s: _Rows(spec, s) for s in SPLITS})
            for t, spec in specs.items()
        }
        options = dict(to_plain(cfg_model.get("options")) or {})
        family = construct(cls, "model.options", inputs, pretrained, specs, **options)
        return family, Beit3Data(family, specs)

    def exclude_patterns(self, cfg_model: Mapping[str, Any]) -> list[str]:
        """Only the configured list: no head is in every task, so `task_specific: auto` makes
        each task's head its own (`head_patterns` name the keys the pretrained model lacks)."""
        return [str(p) for p in (to_plain(cfg_model.get("exclude")) or [])]

    # -- models ---------------------------------------------------------------------------
    def model_shape(self, task: str) -> str:
        return task  # every task has its own architecture

    def build_model(self, task: str) -> nn.Module:
        spec = self._task(task)
        return build_task_model(task, self.arch, self.img_size[task], spec.num_classes)

    def model_keys(self, task: str) -> list[str]:
        with torch.device("meta"):
            return list(self.build_model(task).state_dict())

    # -- inputs ---------------------------------------------------------------------------
    def images(self, task: str, paths: Sequence[str]) -> torch.Tensor:
        root = self.specs[task].root
        return torch.stack([self.transforms[task](load_image(root, p)) for p in paths])

    def encode(self, inputs: Sequence[Any]) -> Batch:
        """Rows of one task to that task's model inputs."""
        tasks = {row["task"] for row in inputs}
        if len(tasks) != 1:
            raise MergeBenchError(f"{self.name}: a batch mixes tasks {sorted(tasks)}")
        task = tasks.pop()
        batch: Batch = {"image": self.images(task, [r["image_path"] for r in inputs])}
        if task == "nlvr2":
            batch["image2"] = self.images(task, [r["image2_path"] for r in inputs])
        if task in ("vqav2", "nlvr2", "coco_retrieval"):
            batch["text"], batch["padding_mask"] = self.text([r["text_segment"] for r in inputs])
        if task == "coco_captioning":  # the first decoding step: [bos] [mask]
            n = len(inputs)
            batch["text"] = torch.tensor([[self.text.bos, self.text.mask]] * n)
            batch["padding_mask"] = torch.zeros(n, 2, dtype=torch.long)
        return batch

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Classification logits; captioning: next-token logits; retrieval: similarities."""
        if "image2" in batch or "text" not in batch:
            return model(**batch)
        if hasattr(model, "encode_text"):
            image = model.encode_image(batch["image"])
            return image @ model.encode_text(batch["text"], batch["padding_mask"]).T
        out = model(**batch)
        return out[:, -1] if out.dim() == 3 else out

    def caption(self, model: nn.Module, image: torch.Tensor) -> list[str]:
        """Captions of a batch of images, decoded as `self.decoding` says (unilm's beam
        search by default; `model.options.caption_decoding=greedy` for argmax decoding)."""

        def step(text: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
            return model(image[owner], text, torch.zeros_like(text))[:, -1]

        t = self.text
        ids = self.decoding.decode(
            step, image.shape[0], Tokens(t.bos, t.eos, t.pad, t.mask), image.device
        )
        return [self.tokenizer.decode(row) for row in ids]


def task_specs(cfg_taskset: Mapping[str, Any]) -> dict[str, Beit3TaskSpec]:
    """Each task's data from `taskset.root`, `taskset.index`, `classes`, `answers`,
    `references` and `examples`."""
    tasks = [str(t) for t in (cfg_taskset.get("tasks") or [])]
    if not tasks:
        raise MergeBenchError("taskset.tasks: no tasks")
    unknown = [t for t in tasks if t not in TASK_KINDS]
    if unknown:
        raise MergeBenchError(
            f"taskset.tasks: unknown BEiT-3 tasks {unknown} (known: {TASK_KINDS})"
        )
    if not cfg_taskset.get("root"):
        raise MergeBenchError(
            "taskset.root: missing (the folder of unilm's index files and images)"
        )
    root = Path(str(cfg_taskset["root"])).expanduser()
    if not root.is_dir():
        raise MergeBenchError(f"taskset.root: {root} is not a folder")
    index = to_plain(cfg_taskset.get("index")) or {}
    classes = to_plain(cfg_taskset.get("classes")) or {}
    examples = to_plain(cfg_taskset.get("examples")) or {}
    limits = {s: examples.get(s) for s in SPLITS}
    specs = {}
    for task in tasks:
        files = index.get(task) or {}
        split_files = {s: tuple(str(f) for f in (files.get(s) or ())) for s in SPLITS}
        if not split_files["test"]:
            raise MergeBenchError(f"taskset.index.{task}.test: no index file")
        answers: tuple[str, ...] = ()
        references = None
        if task == "vqav2":
            answers = tuple(read_answer_vocab(root / str(cfg_taskset.get("answers"))))
            count = len(answers)
        elif task == "coco_captioning":
            references = str(cfg_taskset.get("references") or "")
            count = 0
        elif task == "coco_retrieval":
            count = 0
        else:
            if task not in classes:
                raise MergeBenchError(f"taskset.classes.{task}: missing (the head's classes)")
            count = int(classes[task])
        specs[task] = Beit3TaskSpec(task, root, split_files, count, answers, references, limits)
    return specs


class Beit3Data:
    """The evaluator's side of the BEiT-3 tasks: labels and each task's own scoring."""

    def __init__(self, family: Beit3Family, specs: Mapping[str, Beit3TaskSpec]) -> None:
        self.family = family
        self.specs = dict(specs)
        self._items: dict[tuple[str, str], list[dict[str, Any]]] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    def items(self, task: str, split: str) -> list[dict[str, Any]]:
        if (task, split) not in self._items:
            self._items[task, split] = self.specs[task].items(split)
        return self._items[task, split]

    def num_classes(self, task: str) -> int:
        return self.specs[task].num_classes

    def num_examples(self, task: str, split: str) -> int:
        return len(self.items(task, split))

    def metric_name(self, task: str) -> str:
        return PRIMARY[task]

    def fingerprint(self, task: str) -> str:
        spec = self.specs[task]
        return f"{spec.root}:{spec.index}:{spec.max_examples}"

    def metric(self, task: str) -> Metric:
        if PRIMARY[task] != "accuracy":
            raise MergeBenchError(f"task {task!r}: scored by Beit3Data.score_task, not a metric")
        return build_metric("accuracy", self.num_classes(task))

    def indexed_batches(
        self,
        task: str,
        split: str,
        batch_size: int,
        order: np.ndarray | None = None,
        by_length: bool = False,
    ) -> Iterator[tuple[Batch, torch.Tensor, np.ndarray]]:
        """Labeled batches of the classification tasks (ImageNet, NLVR2)."""
        del by_length
        if PRIMARY[task] != "accuracy":
            raise MergeBenchError(f"task {task!r} has no class labels (see Beit3Data.score_task)")
        items = self.items(task, split)
        check_fields(items, ["label"], f"{self.specs[task].where}.{split}")
        rows = self.family.tasks[task].inputs[split]
        index = np.arange(len(items)) if order is None else np.asarray(order)
        for start in range(0, len(index), batch_size):
            idx = index[start : start + batch_size]
            labels = torch.tensor([int(items[i]["label"]) for i in idx], dtype=torch.long)
            yield self.family.encode([rows[int(i)] for i in idx]), labels, idx

    # -- each task's own evaluation ---------------------------------------------------------
    def score_task(self, model: nn.Module, task: str, split: str, batch_size: int) -> ScoredTask:
        """`task`'s metrics on `split`, primary first (`PRIMARY`)."""
        if task in ("imagenet", "nlvr2"):
            return self._classification(model, task, split, batch_size)
        if task == "vqav2":
            return self._vqa(model, split, batch_size)
        if task == "coco_retrieval":
            return self._retrieval(model, split, batch_size)
        return self._captioning(model, split, batch_size)

    def _classification(self, model: nn.Module, task: str, split: str, batch_size: int):
        preds, labels = [], []
        for batch, label, _ in self.indexed_batches(task, split, batch_size):
            preds.append(self.family.logits(model, batch).argmax(dim=-1))
            labels.append(label)
        pred = torch.cat(preds).numpy() if preds else np.zeros(0, np.int64)
        label = torch.cat(labels).numpy() if labels else np.zeros(0, np.int64)
        value = float((pred == label).mean()) if len(label) else float("nan")
        return ScoredTask({"accuracy": value}, "accuracy", pred, label, self.num_classes(task))

    @staticmethod
    def _per_example(
        name: str,
        values: Sequence[float] | np.ndarray,
        extra: Mapping[str, float] | None = None,
        value: float | None = None,
    ) -> ScoredTask:
        """The task's score (`value`, else the mean of the per-example `values`)."""
        scores = np.asarray(values, dtype=np.float64)
        if value is None:
            value = float(scores.mean()) if len(scores) else float("nan")
        label = np.zeros(len(scores), np.int64)
        return ScoredTask({name: value, **(extra or {})}, "mean", scores, label)

    def _vqa(self, model: nn.Module, split: str, batch_size: int) -> ScoredTask:
        items = self.items("vqav2", split)
        where = f"{self.specs['vqav2'].where}.{split}"
        check_fields(items, ["text_segment"], where)
        answers = self.specs["vqav2"].answers
        rows = self.family.tasks["vqav2"].inputs[split]
        scores = []
        for start in range(0, len(items), batch_size):
            batch = self.family.encode(rows[start : start + batch_size])
            pred = self.family.logits(model, batch).argmax(dim=-1).tolist()
            for item, p in zip(items[start : start + batch_size], pred, strict=True):
                scores.append(_vqa_item_score(item, answers[p], p, where))
        return self._per_example("vqa_accuracy", scores)

    def _retrieval(self, model: nn.Module, split: str, batch_size: int) -> ScoredTask:
        items = self.items("coco_retrieval", split)
        check_fields(items, ["text_segment", "image_id"], f"taskset.index.coco_retrieval.{split}")
        paths: dict[Any, str] = {}  # image id -> its path, in order of first appearance
        for item in items:
            paths.setdefault(item["image_id"], item["image_path"])
        row_of = {image: r for r, image in enumerate(paths)}
        ordered = list(paths.values())
        family = self.family
        image_feats = [
            model.encode_image(family.images("coco_retrieval", ordered[s : s + batch_size]))
            for s in range(0, len(ordered), batch_size)
        ]
        text_feats = []
        for s in range(0, len(items), batch_size):
            text, mask = family.text([it["text_segment"] for it in items[s : s + batch_size]])
            text_feats.append(model.encode_text(text, mask))
        owners = [row_of[it["image_id"]] for it in items]
        result = retrieval_scores(torch.cat(image_feats), torch.cat(text_feats), owners)
        # unilm's mean of the six recalls; the per-image shares (for the bootstrap) average
        # to it only where every image has the same number of captions.
        return self._per_example("recall_mean", result.per_image, result.recalls, result.mean)

    def _captioning(self, model: nn.Module, split: str, batch_size: int) -> ScoredTask:
        spec = self.specs["coco_captioning"]
        items = self.items("coco_captioning", split)
        check_fields(items, ["image_id"], f"{spec.where}.{split}")
        refs = read_caption_references(spec.root / str(spec.references))
        paths: dict[int, str] = {}  # one caption per image
        for item in items:
            paths.setdefault(int(item["image_id"]), item["image_path"])
        missing = [i for i in paths if i not in refs]
        if missing:
            raise MergeBenchError(
                f"taskset.references: {spec.references} has no captions for image {missing[0]}"
            )
        ids = list(paths)
        captions: dict[int, str] = {}
        for s in range(0, len(ids), batch_size):
            part = ids[s : s + batch_size]
            image = self.family.images("coco_captioning", [paths[i] for i in part])
            captions.update(zip(part, self.family.caption(model, image), strict=True))
        result = caption_scores(captions, refs)
        for metric, why in result.skipped.items():
            print(f"coco_captioning: {metric} skipped: {why}", file=sys.stderr)
        extra = {k: result.scores[k] for k in ("bleu4", "meteor", "rouge_l") if k in result.scores}
        return self._per_example("cider", result.per_image_cider, extra)


def _vqa_item_score(item: Mapping[str, Any], answer: str, label: int, where: str) -> float:
    """The official VQA accuracy where the item has its ten human answers; unilm's soft
    score of the predicted answer (its `labels`/`scores`) otherwise."""
    if item.get("answers"):
        return vqa_accuracy(answer, [str(a) for a in item["answers"]])
    if "labels" not in item or "scores" not in item:
        raise MergeBenchError(f"{where}: item {item.get('qid')} has no answers, labels or scores")
    soft = dict(zip((int(x) for x in item["labels"]), item["scores"], strict=True))
    return float(soft.get(label, 0.0))


__all__ = ["DEFAULT_IMG_SIZE", "PRIMARY", "Beit3Data", "Beit3Family", "Beit3TaskSpec", "task_specs"]
