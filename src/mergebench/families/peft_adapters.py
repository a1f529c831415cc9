"""PEFT adapter families: (IA)3 (`t0_3b_ia3`) and LoRA (`t5_lora`) adapters over one
shared encoder-decoder base model (T0-3B), evaluated by rank classification on prompted
tasks (`taskset=t0_11`).

Checkpoints: `model.checkpoints.pretrained` is the base model (a transformers folder or hub
id); each `model.checkpoints.finetuned.<task>` is an adapter folder written by peft's
`save_pretrained` (`adapter_config.json` + `adapter_model.safetensors`). Only adapter
weights are merged; the base model is shared and is not part of the pool:

- (IA)3: the pool's keys are the adapter file's `*.ia3_l` keys; the pretrained side is an
  all-ones vector per key (the initialisation), so every method sees `tau = l - 1` and its
  merged `1 + tau` is the merged scaling vector, loaded into a peft (IA)3 model of the base.
- LoRA: merged in weight space. The pool's keys are the target modules' base weights
  (`encoder.block.0.layer.0.SelfAttention.q.weight`, ...): the pretrained side reads them from
  the base model, each task's side is `W + B @ A * scale` computed per key
  (`mergebench.engine.adapters`), so task vectors are the LoRA deltas. The merged model is
  the base model with the merged weights on those modules.

The runnable model (`AdapterModel`) is one shared base model plus the tensors of the pool,
owned by each built model and installed into the base before it runs: its state dict is
exactly the pool's keys, so the common evaluator, `TaskSwitcher` and data-based methods load
merged weights as for any family, and several built models cost one base model.

Rank classification (as T-Few, which trained and evaluated the paper's (IA)3 adapters):
each answer choice is scored by the sum over its tokens (EOS included) of the model's
log-probabilities given the prompt; T-Few's `length_norm` defaults to 0 (summed) and its
`ia3.json` does not change it. `options.length_norm: true` divides by the number of tokens.
The scores are the logits `[batch, classes]`, one per choice, so accuracy is the argmax.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mergebench.data.hf import (
    DataSpec,
    Examples,
    InputRows,
    open_split,
    parse_data_spec,
    split_rows,
)
from mergebench.data.splits import SPLITS
from mergebench.engine.adapters import (
    IdentitySource,
    LoRADeltaSource,
    base_weights,
    lora_modules,
)
from mergebench.engine.checkpoints import TensorReader, open_checkpoint
from mergebench.engine.pool import Batch
from mergebench.families.base import TaskInputs, model_folder
from mergebench.families.labeled import HFLabeledData
from mergebench.families.paper import PaperFamily
from mergebench.util.config import to_plain as _plain
from mergebench.util.errors import MergeBenchError, construct

# ------------------------------------------------------------------------------ prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A task's prompt: `template` and each of `choices` are format strings over the input
    columns (`{premise}`, `{endings[0]}`); the label of choice `i` is `i + label_offset`."""

    template: str
    choices: tuple[str, ...]
    label_offset: int = 0

    @classmethod
    def from_config(cls, task: str, cfg: Any) -> Prompt:
        where = f"taskset.data.{task}.prompt"
        if not isinstance(cfg, Mapping) or not cfg.get("template") or not cfg.get("choices"):
            raise MergeBenchError(f"{where}: expected {{template: ..., choices: [...]}}")
        choices = cfg["choices"]
        if isinstance(choices, str) or len(choices) < 2:
            raise MergeBenchError(f"{where}.choices: a list of at least two answer choices")
        return cls(
            str(cfg["template"]), tuple(str(c) for c in choices), int(cfg.get("label_offset", 0))
        )

    def render(self, task: str, row: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
        try:
            return self.template.format(**row), tuple(c.format(**row) for c in self.choices)
        except (KeyError, IndexError) as err:
            raise MergeBenchError(
                f"taskset.data.{task}.prompt: field {err} is not an input column "
                f"(columns: {', '.join(row)})"
            ) from None


class PromptRows(InputRows):
    """A split's rows rendered with the task's prompt: `(prompt, (choice, ...))` each."""

    def __init__(
        self, spec: DataSpec, split: str, seed: int, examples: Examples, prompt: Prompt
    ) -> None:
        super().__init__(spec, split, seed, examples)
        self._prompt = prompt

    def _fetch(self, rows: np.ndarray) -> list[Any]:
        values = super()._fetch(rows)
        columns = self._spec.inputs
        if len(columns) == 1:
            values = [(v,) for v in values]
        return [
            self._prompt.render(self._spec.task, dict(zip(columns, v, strict=True))) for v in values
        ]


class PromptLabeledData(HFLabeledData):
    """`HFLabeledData` whose labels are shifted by the prompt's `label_offset` (Winogrande
    and Story Cloze number their answers from 1)."""

    def __init__(self, family, specs, seed, examples, prompts: Mapping[str, Prompt]) -> None:
        super().__init__(family, specs, seed, examples)
        self._prompts = dict(prompts)

    def labels(self, task: str, split: str) -> np.ndarray:
        spec = self.spec(task)
        source, rows = split_rows(spec, split, self._seed, self._examples)
        dataset = open_split(spec, source)
        if spec.label not in dataset.column_names:
            raise MergeBenchError(
                f"{spec.where}.label: split {source!r} of {spec.label_text} has no column "
                f"{spec.label!r} (columns: {', '.join(dataset.column_names)})"
            )
        column = np.asarray(dataset.select_columns([spec.label])[spec.label])[rows]
        try:  # Winogrande's and HellaSwag's answers are strings ("1", "2")
            labels = column.astype(np.int64) - self._prompts[task].label_offset
        except ValueError:
            raise MergeBenchError(
                f"{spec.where}.splits.{split}: split {source!r} of {spec.label_text} has no "
                "labels (empty answers); use a labeled split"
            ) from None
        classes = self.num_classes(task)
        if len(labels) and (labels.min() < 0 or labels.max() >= classes):
            raise MergeBenchError(
                f"{spec.where}: {spec.label_text} has labels {int(labels.min())}..."
                f"{int(labels.max())} after label_offset, but the prompt has {classes} choices"
            )
        return labels


# ------------------------------------------------------------------------------ models


def _nested_module(root: nn.Module, path: list[str]) -> nn.Module:
    for part in path:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        root = root._modules[part]
    return root


class AdapterModel(nn.Module):
    """A shared base model run with this model's own copies of a few tensors (`slots`: our
    key -> (module of the base, attribute)). Its parameters, hence its state dict, are those
    tensors under their pool keys; `forward` installs them into the base first."""

    def __init__(
        self, base: nn.Module, slots: Mapping[str, tuple[nn.Module, str]], dtype: torch.dtype
    ) -> None:
        super().__init__()
        self._shared = [base]  # a list: the base is not a submodule (not in the state dict)
        self._slots = dict(slots)
        self._params: dict[str, nn.Parameter] = {}
        for key, (module, attr) in self._slots.items():
            value = getattr(module, attr)
            param = nn.Parameter(value.detach().clone().to(dtype), requires_grad=False)
            *path, leaf = key.split(".")
            _nested_module(self, path).register_parameter(leaf, param)
            self._params[key] = param

    @property
    def base(self) -> nn.Module:
        return self._shared[0]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.base._apply(fn, recurse)
        self._params = dict(self.named_parameters())
        return self

    def install(self) -> nn.Module:
        """Put this model's tensors into the shared base; the base, ready to run."""
        for key, (module, attr) in self._slots.items():
            setattr(module, attr, self._params[key])
        return self.base

    def forward(self, **kwargs):
        return self.install()(**kwargs)


# ------------------------------------------------------------------------------ families


class PeftT0Family(PaperFamily):
    """Adapters over one seq2seq base model, rank classification on prompted tasks."""

    kind = "t0"
    modality = "text"
    peft_type = ""  # the adapter_config.json `peft_type` this family reads

    def __init__(
        self,
        tasks: dict[str, TaskInputs],
        pretrained_path: Path,
        specs: Mapping[str, DataSpec],
        eval_batch_size: int = 8,
        max_length: int = 512,
        length_norm: bool = False,
        dtype: str = "float32",
    ) -> None:
        super().__init__(tasks, pretrained_path, specs, eval_batch_size)
        from transformers import AutoConfig, AutoTokenizer

        folder = model_folder(pretrained_path)
        try:
            self.config = AutoConfig.from_pretrained(str(folder))
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MergeBenchError(
                f"model.checkpoints.pretrained: cannot load the config and tokenizer of {folder} "
                f"({first})"
            ) from None
        if self.tokenizer.pad_token_id is None:
            raise MergeBenchError(f"{folder}: the tokenizer has no padding token")
        self.max_length = int(max_length)
        self.length_norm = bool(length_norm)
        self.dtype = getattr(torch, dtype)
        self.adapters: dict[str, Path] = {}  # task -> adapter folder (set by pool_sources)
        self._base: nn.Module | None = None

    # -- configuration -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg_model, cfg_taskset, seed, pretrained):
        cls.check_taskset(cfg_model, cfg_taskset)
        tasks = [str(t) for t in (cfg_taskset.get("tasks") or [])]
        if not tasks:
            raise MergeBenchError("taskset.tasks: no tasks")
        data_cfg = _plain(cfg_taskset.get("data")) or {}
        cache_dir = cfg_taskset.get("cache_dir")
        specs, prompts = {}, {}
        for task in tasks:
            cfg = dict(data_cfg.get(task) or {})
            prompts[task] = Prompt.from_config(task, cfg.pop("prompt", None))
            columns = cfg.get("inputs") or []
            columns = [columns] if isinstance(columns, str) else list(columns)
            cfg["inputs"] = columns[:1]  # parse_data_spec checks one or two columns
            spec = parse_data_spec(task, cfg, cache_dir)
            specs[task] = dataclasses.replace(spec, inputs=tuple(str(c) for c in columns))
        examples = Examples.from_config(_plain(cfg_taskset.get("examples")))
        inputs = {
            t: TaskInputs(
                num_classes=len(prompts[t].choices),
                inputs={s: PromptRows(spec, s, int(seed), examples, prompts[t]) for s in SPLITS},
            )
            for t, spec in specs.items()
        }
        options = dict(_plain(cfg_model.get("options")) or {})
        family = construct(cls, "model.options", inputs, pretrained, specs=specs, **options)
        return family, PromptLabeledData(family, specs, int(seed), examples, prompts)

    @classmethod
    def task_classes(cls, spec: DataSpec) -> tuple[str, ...]:  # the prompt's choices count
        raise MergeBenchError(f"task {spec.task!r}: the classes of a t0 task are its choices")

    # -- inputs ------------------------------------------------------------------------------
    def encode(self, inputs: Sequence[Any]) -> Batch:
        """Rendered rows `(prompt, choices)` to the prompt's ids and the choices' ids
        `[batch, choices, length]` (padded; EOS appended as the tokenizer does)."""
        rows = list(inputs)
        prompts = [r[0] for r in rows]
        counts = {len(r[1]) for r in rows}
        if len(counts) > 1:
            raise MergeBenchError(f"rows with different numbers of choices: {sorted(counts)}")
        enc = self.tokenizer(
            prompts,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        choices = [c for r in rows for c in r[1]]
        dec = self.tokenizer(
            choices, padding="longest", truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )  # fmt: skip
        n = counts.pop() if rows else 0
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "choice_ids": dec["input_ids"].view(len(rows), n, -1),
            "choice_mask": dec["attention_mask"].view(len(rows), n, -1),
        }

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-choice log-likelihood of the answer given the prompt: `[batch, choices]`."""
        net = model.install() if isinstance(model, AdapterModel) else model
        ids, mask = batch["input_ids"], batch["attention_mask"]
        choice_ids, choice_mask = batch["choice_ids"], batch["choice_mask"]
        bs, n, length = choice_ids.shape
        encoded = net.get_encoder()(input_ids=ids, attention_mask=mask)[0]
        encoded = encoded.repeat_interleave(n, dim=0)
        flat_ids = choice_ids.reshape(bs * n, length)
        flat_mask = choice_mask.reshape(bs * n, length)
        start = self.config.decoder_start_token_id
        start = self.tokenizer.pad_token_id if start is None else start
        decoder_ids = torch.cat([torch.full_like(flat_ids[:, :1], start), flat_ids[:, :-1]], 1)
        out = net(
            encoder_outputs=(encoded,),
            attention_mask=mask.repeat_interleave(n, dim=0),
            decoder_input_ids=decoder_ids,
        )
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        token = logp.gather(-1, flat_ids.unsqueeze(-1)).squeeze(-1) * flat_mask
        scores = token.sum(-1)
        if self.length_norm:
            scores = scores / flat_mask.sum(-1).clamp(min=1)
        return scores.view(bs, n)

    # -- models ------------------------------------------------------------------------------
    def _adapter_config(self, task: str | None = None) -> dict[str, Any]:
        if not self.adapters:
            raise MergeBenchError(
                f"model {self.name!r}: no adapters opened yet (the pool opens them)"
            )
        folder = self.adapters[task] if task else next(iter(self.adapters.values()))
        path = folder / "adapter_config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise MergeBenchError(f"{path}: not a readable adapter config ({err})") from None
        if config.get("peft_type") != self.peft_type:
            raise MergeBenchError(
                f"{path}: peft_type {config.get('peft_type')!r}, model {self.name!r} takes "
                f"{self.peft_type!r} adapters"
            )
        return config

    def _seq2seq(self) -> nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(
            str(model_folder(self.pretrained_path)), dtype=self.dtype
        )
        model.requires_grad_(False)
        return model.eval()

    def shared_base(self) -> nn.Module:
        """The base model every built model runs (loaded once)."""
        if self._base is None:
            self._base = self._wrap(self._seq2seq())
        return self._base

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def _new_model(self, num_classes: int) -> nn.Module:
        return AdapterModel(self.shared_base(), self._slots(), self.dtype)

    def build_model(self, task: str) -> nn.Module:
        self._task(task)
        return self._new_model(self.tasks[task].num_classes)

    def model_keys(self, task: str) -> list[str]:
        return list(self._slots())

    def _slots(self) -> dict[str, tuple[nn.Module, str]]:
        raise NotImplementedError

    def pool_sources(
        self, finetuned: Mapping[str, Path]
    ) -> tuple[TensorReader, dict[str, TensorReader]]:
        raise NotImplementedError


class IA3Family(PeftT0Family):
    """(IA)3 adapters (T0-3B in the paper): pool keys are the adapter file's `*.ia3_l`."""

    name = "t0_3b_ia3"
    peft_type = "IA3"

    def pool_sources(self, finetuned):
        self.adapters = {t: Path(p) for t, p in finetuned.items()}
        readers = {t: open_checkpoint(p, role=f"finetuned[{t}]") for t, p in self.adapters.items()}
        for task in readers:
            self._adapter_config(task)
        first = next(iter(readers.values()))
        return IdentitySource(first), readers

    def _wrap(self, model: nn.Module) -> nn.Module:
        from peft import IA3Config, get_peft_model

        config = {k: v for k, v in self._adapter_config().items() if not k.startswith("_")}
        fields = {f.name for f in dataclasses.fields(IA3Config)}
        peft_config = IA3Config(**{k: v for k, v in config.items() if k in fields})
        peft_config.inference_mode = True
        return get_peft_model(model, peft_config).eval()

    def _slots(self):
        slots = {}
        for name, module in self.shared_base().named_modules():
            store = getattr(module, "ia3_l", None)
            if isinstance(store, nn.ParameterDict) and "default" in store:
                slots[f"{name}.ia3_l"] = (store, "default")
        return slots


class LoRAFamily(PeftT0Family):
    """LoRA adapters merged in weight space: pool keys are the target modules' weights."""

    name = "t5_lora"
    peft_type = "LORA"

    def pool_sources(self, finetuned):
        self.adapters = {t: Path(p) for t, p in finetuned.items()}
        base = open_checkpoint(self.pretrained_path, role="pretrained")
        readers: dict[str, TensorReader] = {}
        modules = None
        for task, folder in self.adapters.items():
            config = self._adapter_config(task)
            if config.get("use_dora"):
                raise MergeBenchError(f"{folder}: DoRA adapters are not weight deltas")
            adapter = open_checkpoint(folder, role=f"finetuned[{task}]")
            mods = lora_modules(adapter)
            modules = modules or mods
            readers[task] = LoRADeltaSource(base, adapter, config, mods)
        return base_weights(base, modules or []), readers

    def _slots(self):
        self._adapter_config()
        base = self.shared_base()
        modules = dict(base.named_modules())
        first = open_checkpoint(next(iter(self.adapters.values())), role="adapter")
        slots = {}
        for m in lora_modules(first):
            owner = m.weight[: -len(".weight")]
            if owner not in modules:
                raise MergeBenchError(f"LoRA target {owner!r} is not a module of the base model")
            slots[m.weight] = (modules[owner], "weight")
        return slots


__all__ = [
    "AdapterModel",
    "IA3Family",
    "LoRAFamily",
    "PeftT0Family",
    "Prompt",
    "PromptLabeledData",
    "PromptRows",
]
