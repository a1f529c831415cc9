"""Sequence classifiers of `transformers`: the generic `hf_sequence_classification` family, and
the GLUE paper settings RoBERTa-base (`roberta_base`) and GPT-2 (`gpt2`) as configurations of it.

The runnable model is `AutoModelForSequenceClassification` built from the pretrained model's
config with the task's number of labels (one for a regression such as STS-B): BERT, RoBERTa,
GPT-2, DeBERTa ... whatever the config's `model_type` names. The backbone is the model's
`base_model_prefix` (`bert.`, `roberta.`, `transformer.`); every other top-level module is a
task head (`classifier.*`, `score.*`, `pre_classifier.*`), brought by each fine-tuned
checkpoint and never merged. The pretrained checkpoint may be a bare backbone (`BertModel`)
or carry another head (a masked-LM head): only the backbone is read from it.

The generic family takes each task's classes from its fine-tuned checkpoint's config
(`num_labels`, `id2label`): string labels in the data are mapped by `id2label` when its names
are real ones (not `LABEL_0`...), else by the data's sorted names. The GLUE settings take
them from the data set's `ClassLabel` column, as the hub's GLUE has them.

Inputs are one sentence or a sentence pair, tokenized by the pretrained model's tokenizer and
padded to the longest of the batch. A tokenizer without a padding token (GPT-2) pads with its
end-of-text token, as FusionBench does, and the classifier reads the last non-padding token.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergebench.data.hf import DataSpec
from mergebench.data.hf_labels import class_names, label_form
from mergebench.engine.pool import Batch
from mergebench.families.base import model_folder
from mergebench.families.paper import PaperFamily
from mergebench.util.errors import MergeBenchError, first_line

# Models whose position ids start after the padding index (roberta-base's 514 rows hold 512).
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "data2vec-text", "xmod"}


def _load_config(path: Path, option: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_folder(path)))
    except Exception as err:
        raise MergeBenchError(
            f"{option}: cannot load the config of {model_folder(path)} ({first_line(err)})"
        ) from None


def checkpoint_classes(spec: DataSpec, path: Path) -> DataSpec:
    """`spec` with the classes of the fine-tuned checkpoint at `path` (its config's
    `num_labels` and `id2label`), checked against the task's data."""
    option = f"model.checkpoints.finetuned.{spec.task}"
    config = _load_config(path, option)
    count = int(config.num_labels)
    names = tuple(str(config.id2label.get(i, f"LABEL_{i}")) for i in range(count))
    return head_classes(spec, option, count, names)


def head_classes(spec: DataSpec, option: str, count: int, names: tuple[str, ...]) -> DataSpec:
    """`spec` with the classes of a fine-tuned head of `count` outputs named `names`
    (`LABEL_<i>` where the checkpoint names none), checked against the task's data."""
    if spec.regression or count == 1:
        if not (spec.regression and count == 1):
            what = "a regression" if spec.regression else "a classification"
            raise MergeBenchError(
                f"{option}: a head of {count} output(s) for {what} task "
                f"(taskset.data.{spec.task}.metric={spec.metric}); a score takes "
                "metric=pearson_spearman and one output"
            )
        return spec
    form = label_form(spec)
    if form in ("configured", "named"):
        data = class_names(spec)
        if len(data) != count:
            raise MergeBenchError(
                f"{option}: {count} labels, but taskset.data.{spec.task} has {len(data)} "
                f"classes ({', '.join(data)})"
            )
        return spec
    generic = all(name == f"LABEL_{i}" for i, name in enumerate(names))
    data = class_names(spec)  # sorted names, or 0..max for class ids
    if form == "text" and not generic:
        missing = sorted(set(data) - set(names))
        if missing:
            raise MergeBenchError(
                f"{option}: label {missing[0]!r} of taskset.data.{spec.task} is not one of the "
                f"checkpoint's labels (id2label: {', '.join(names)})"
            )
        return dataclasses.replace(spec, classes=names)
    if form == "text" and len(data) != count:
        raise MergeBenchError(
            f"{option}: {count} labels, the data of task {spec.task!r} {len(data)} "
            f"({', '.join(data)}); list them in the head's order: "
            f"taskset.data.{spec.task}.classes=[...]"
        )
    if form == "ids" and len(data) > count:
        raise MergeBenchError(
            f"{option}: {count} labels, but taskset.data.{spec.task} has class id {len(data) - 1}"
        )
    return dataclasses.replace(spec, classes=data if form == "text" else names)


class HFSequenceClassificationFamily(PaperFamily):
    """Fine-tunes of one base by `AutoModelForSequenceClassification`, on sentence (pair) tasks."""

    name = "hf_sequence_classification"
    kind = "hf_sequence_classification"
    modality = "text"
    reads_finetuned = True

    def __init__(
        self,
        tasks,
        pretrained_path: Path,
        specs: Mapping[str, DataSpec],
        eval_batch_size: int = 32,
        max_length: int | None = None,
    ) -> None:
        super().__init__(tasks, pretrained_path, specs, eval_batch_size)
        from transformers import AutoTokenizer

        folder = model_folder(pretrained_path)
        try:
            self.config = _load_config(pretrained_path, "model.checkpoints.pretrained")
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except MergeBenchError:
            raise
        except Exception as err:
            raise MergeBenchError(
                f"model.checkpoints.pretrained: cannot load the tokenizer of {folder} "
                f"({first_line(err)})"
            ) from None
        self.prepare_tokenizer()
        limit = getattr(self.config, "max_position_embeddings", None) or 512
        if getattr(self.config, "model_type", "") in _OFFSET_POSITIONS:
            limit -= (self.config.pad_token_id or 0) + 1
        self.max_length = min(max_length or limit, limit)
        self._find_heads()

    def _find_heads(self) -> None:
        """The backbone prefix and the head modules, read off the model built on `meta`."""
        with torch.device("meta"):
            probe = self._new_model(2)
        self.backbone_prefix = str(probe.base_model_prefix)
        heads = sorted(
            {
                k.split(".")[0]
                for k in probe.state_dict()
                if not k.startswith(self.backbone_prefix + ".")
            }
        )
        self.head_patterns = tuple(re.escape(h) + r"\..*" for h in heads)

    @classmethod
    def task_specs(
        cls, specs: dict[str, DataSpec], finetuned: Mapping[str, Path] | None
    ) -> dict[str, DataSpec]:
        if finetuned is None:
            return specs
        return {task: checkpoint_classes(spec, finetuned[task]) for task, spec in specs.items()}

    def prepare_tokenizer(self) -> None:
        """A tokenizer without a padding token pads with its end-of-text token, on the right."""
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise MergeBenchError(
                    "model.checkpoints.pretrained: its tokenizer has neither a padding nor an "
                    "end-of-text token"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.tokenizer.padding_side = "right"

    @classmethod
    def task_classes(cls, spec: DataSpec) -> tuple[str, ...]:
        return class_names(spec)

    def encode(self, inputs: Sequence[Any]) -> Batch:
        rows = list(inputs)
        pairs = bool(rows) and isinstance(rows[0], tuple)
        first = [r[0] if pairs else r for r in rows]
        second = [r[1] for r in rows] if pairs else None
        enc = self.tokenizer(
            first,
            second,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def model_config(self, num_classes: int):
        config = self.config.__class__.from_dict(self.config.to_dict())
        config.num_labels = num_classes
        config.problem_type = "regression" if num_classes == 1 else "single_label_classification"
        if config.pad_token_id is None:  # the classifier pools the last non-padding token
            config.pad_token_id = self.tokenizer.pad_token_id
        return config

    def _new_model(self, num_classes: int) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_config(self.model_config(num_classes))


class HFTextFamily(HFSequenceClassificationFamily):
    """A GLUE paper setting: classes from the data set's `ClassLabel` column."""

    kind = "glue"
    reads_finetuned = False


class RobertaFamily(HFTextFamily):
    name = "roberta_base"


class GPT2Family(HFTextFamily):
    name = "gpt2"


__all__ = [
    "GPT2Family",
    "HFSequenceClassificationFamily",
    "HFTextFamily",
    "RobertaFamily",
    "checkpoint_classes",
    "head_classes",
]
