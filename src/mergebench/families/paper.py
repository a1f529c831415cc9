"""What the paper settings' families share (CLIP, RoBERTa, GPT-2): configured checkpoints
instead of the embedded zoo, and Hugging Face data sets.

`PaperFamily.from_config(cfg_model, cfg_taskset, seed, pretrained)` gives the family
(label-free, what methods see) and its `HFLabeledData` (the evaluator's); the checkpoints of
`model.checkpoints` are opened by `mergebench.sources.configured`. A model config looks like:

    name: gpt2
    checkpoints:
      pretrained: gpt2                  # hub id or local path
      finetuned: {cola: tanganke/gpt2_cola, ...}
    exclude: ['score\\..*']
    options: {...}                      # keyword arguments of the family
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergebench.data.hf import (
    DataSpec,
    Examples,
    InputRows,
    parse_data_spec,
)
from mergebench.data.splits import SPLITS
from mergebench.families.base import Family, TaskInputs
from mergebench.families.labeled import HFLabeledData
from mergebench.util.config import to_plain as _plain
from mergebench.util.errors import MergeBenchError, construct


class PaperFamily(Family):
    """A family with configured checkpoints (hub ids or paths) and Hugging Face data sets."""

    # The model's base prefix: checkpoints may store keys with or without it.
    backbone_prefix: str = ""
    # Task-specific keys of the model (always excluded from merging).
    head_patterns: tuple[str, ...] = ()
    # Whether the family, not the checkpoints, supplies the heads (CLIP's zero-shot heads).
    heads_separate: bool = False
    # Whether `from_config` needs the fine-tuned checkpoints (their configs name the classes).
    reads_finetuned: bool = False

    def __init__(
        self,
        tasks: dict[str, TaskInputs],
        pretrained_path: Path,
        specs: Mapping[str, DataSpec],
        eval_batch_size: int = 64,
    ) -> None:
        super().__init__(tasks, eval_batch_size)
        self.pretrained_path = pretrained_path
        self.specs = dict(specs)  # where each task's data lives (no labels in there)

    # -- what subclasses provide -------------------------------------------------------------
    @classmethod
    def task_classes(cls, spec: DataSpec) -> tuple[str, ...]:
        """Class names of one task (their number is the head's size)."""
        raise NotImplementedError

    @classmethod
    def task_specs(
        cls, specs: dict[str, DataSpec], finetuned: Mapping[str, Path] | None
    ) -> dict[str, DataSpec]:
        """Hook: the data specs as this family reads them (a generic classifier takes its
        class names from each fine-tuned checkpoint's config, `reads_finetuned`)."""
        return specs

    def head_tensors(self, task: str) -> dict[str, torch.Tensor]:
        """Head tensors that the family computes itself (CLIP); the checkpoints' otherwise."""
        return {}

    # -- construction from the Hydra config ---------------------------------------------------
    @classmethod
    def from_config(
        cls,
        cfg_model: Mapping[str, Any],
        cfg_taskset: Mapping[str, Any],
        seed: int,
        pretrained: Path,
        finetuned: Mapping[str, Path] | None = None,
    ) -> tuple[PaperFamily, HFLabeledData]:
        """The family and its labeled data; `pretrained` is the resolved pretrained checkpoint
        (its folder holds the config and tokenizer the family builds models from), `finetuned`
        the resolved task checkpoints where the family `reads_finetuned`."""
        cls.check_taskset(cfg_model, cfg_taskset)
        tasks = [str(t) for t in (cfg_taskset.get("tasks") or [])]
        if not tasks:
            raise MergeBenchError("taskset.tasks: no tasks")
        data_cfg = _plain(cfg_taskset.get("data")) or {}
        cache_dir = cfg_taskset.get("cache_dir")
        specs = {t: parse_data_spec(t, data_cfg.get(t), cache_dir) for t in tasks}
        specs = cls.task_specs(specs, finetuned)
        examples = Examples.from_config(_plain(cfg_taskset.get("examples")))
        inputs = {
            t: TaskInputs(
                num_classes=len(cls.task_classes(spec)),
                inputs={s: InputRows(spec, s, int(seed), examples) for s in SPLITS},
            )
            for t, spec in specs.items()
        }
        options = dict(_plain(cfg_model.get("options")) or {})
        family = construct(cls, "model.options", inputs, pretrained, specs=specs, **options)
        return family, HFLabeledData(family, specs, int(seed), examples)

    def exclude_patterns(self, cfg_model: Mapping[str, Any]) -> list[str]:
        """The configured exclude list, plus this family's heads (never merged)."""
        patterns = [str(p) for p in (_plain(cfg_model.get("exclude")) or [])]
        return patterns + [p for p in self.head_patterns if p not in patterns]

    def model_keys(self, task: str) -> list[str]:
        """The state dict keys of the model for `task`, built without allocating weights."""
        with torch.device("meta"):
            model = self._new_model(self._task(task).num_classes)
        return list(model.state_dict())

    def build_model(self, task: str) -> nn.Module:
        model = self._new_model(self._task(task).num_classes)
        heads = self.head_tensors(task)
        if heads:
            model.load_state_dict(heads, strict=False)
        return model


__all__ = ["PaperFamily"]
