"""GLUE families: RoBERTa-base (`roberta_base`) and GPT-2 (`gpt2`) sequence classifiers.

The runnable model is transformers' own `RobertaForSequenceClassification` /
`GPT2ForSequenceClassification`, built from the pretrained model's config with the task's
number of labels (one for STS-B, a regression). Every fine-tuned checkpoint brings its own
head (`classifier.*`, `score.*`), which is never merged; the pretrained checkpoint (a masked
or causal language model on the hub) gives the backbone only.

Inputs are one sentence or a sentence pair, tokenized by the pretrained model's tokenizer and
padded to the longest of the batch. GPT-2 has no padding token: it pads with its
end-of-text token, as FusionBench does, and its classifier reads the last non-padding token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergebench.data.hf import DataSpec, class_names
from mergebench.engine.pool import Batch
from mergebench.families.base import model_folder
from mergebench.families.paper import PaperFamily
from mergebench.util.errors import MergeBenchError, first_line


class HFTextFamily(PaperFamily):
    """A transformers sequence classifier on GLUE-style sentence (pair) tasks."""

    kind = "glue"
    modality = "text"
    model_class = ""  # the transformers class name

    def __init__(
        self,
        tasks,
        pretrained_path: Path,
        specs: Mapping[str, DataSpec],
        eval_batch_size: int = 32,
        max_length: int | None = None,
    ) -> None:
        super().__init__(tasks, pretrained_path, specs, eval_batch_size)
        from transformers import AutoConfig, AutoTokenizer

        folder = model_folder(pretrained_path)
        try:
            self.config = AutoConfig.from_pretrained(str(folder))
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as err:
            first = first_line(err)
            raise MergeBenchError(
                f"model.checkpoints.pretrained: cannot load the config and tokenizer of {folder} "
                f"({first})"
            ) from None
        self.prepare_tokenizer()
        limit = getattr(self.config, "max_position_embeddings", None) or 512
        self.max_length = min(max_length or limit, limit)

    def prepare_tokenizer(self) -> None:
        """Hook: GPT-2 needs a padding token."""

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
        return config

    def _new_model(self, num_classes: int) -> nn.Module:
        import transformers

        return getattr(transformers, self.model_class)(self.model_config(num_classes))


class RobertaFamily(HFTextFamily):
    name = "roberta_base"
    model_class = "RobertaForSequenceClassification"
    backbone_prefix = "roberta"
    head_patterns = (r"classifier\..*",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Positions start after the padding index: roberta-base's 514 rows hold 512 tokens.
        usable = self.config.max_position_embeddings - (self.config.pad_token_id or 0) - 1
        self.max_length = min(self.max_length, usable)


class GPT2Family(HFTextFamily):
    name = "gpt2"
    model_class = "GPT2ForSequenceClassification"
    backbone_prefix = "transformer"
    head_patterns = (r"score\..*",)

    def prepare_tokenizer(self) -> None:
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"

    def model_config(self, num_classes: int):
        config = super().model_config(num_classes)
        # The classifier pools the last token that is not padding: padding must be known.
        config.pad_token_id = self.tokenizer.pad_token_id
        return config


__all__ = ["GPT2Family", "HFTextFamily", "RobertaFamily"]
