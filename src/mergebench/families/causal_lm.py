"""Causal language models (any `AutoModelForCausalLM`: Llama, Gemma 2, Qwen2, Mistral ...)
merged whole and scored by lm-evaluation-harness in this process.

    mergebench model=causal_lm model.checkpoints.pretrained=BASE \
        'model.checkpoints.finetuned={math: MATH, code: CODE}' \
        taskset=lm_eval 'taskset.tasks=[gsm8k_cot, humaneval]' \
        'taskset.expert_tasks={math: gsm8k_cot, code: humaneval}' method=emr

The pool is the checkpoints as they are (every weight merged, no head excluded); tied
embeddings, vocabulary policy (`model.vocab`) and output dtype (`model.out_dtype`) are the
engine's (`mergebench.engine.llm`). The pool's tasks are the experts; the board's tasks are
lm-eval tasks. `taskset.expert_tasks` says which expert is the `individual` on which task(s)
(default: the expert named like the task); a task-conditioned result (EMR) scores each task
with its expert's weights, switched in place.

`LMEvalData` is the evaluator's side: a merged result is loaded (or switched) into one model
built from the base's config, wrapped by lm-eval's HFLM (no save, no re-load). Reference
rows: `pretrained` (the base on every task), `expert:<name>` (each expert on every task) and
`individual` (each expert on its own tasks), each checkpoint loaded with its own config and
tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergebench.data.lm_eval import (
    SampleScores,
    check_options,
    check_unsafe_code,
    score_task,
    task_manager,
)
from mergebench.data.splits import SPLITS
from mergebench.engine.checkpoints import TensorReader, open_checkpoint
from mergebench.engine.llm import parse_out_dtype
from mergebench.families.base import TaskInputs
from mergebench.families.paper import PaperFamily
from mergebench.results import MergeResult, TaskConditionedResult
from mergebench.results.switching import TaskSwitcher
from mergebench.util.config import to_plain
from mergebench.util.errors import MergeBenchError, construct

EVAL_SPLIT = "test"  # lm-eval's own evaluation split of each task


class CausalLMFamily(PaperFamily):
    """Experts of one causal LM base; the pool's tasks are the experts."""

    name = "causal_lm"
    kind = "causal_lm"
    modality = "text"

    def __init__(
        self,
        tasks: dict[str, TaskInputs],
        pretrained_path: Path,
        specs: Mapping[str, Any],
        eval_batch_size: int = 8,
        device: str = "cpu",
    ) -> None:
        super().__init__(tasks, pretrained_path, specs, eval_batch_size)
        self.device = device
        self.expert_paths: dict[str, Path] = {}  # filled when the pool is opened

    @classmethod
    def from_config(
        cls,
        cfg_model: Mapping[str, Any],
        cfg_taskset: Mapping[str, Any],
        seed: int,
        pretrained: Path,
        finetuned: Mapping[str, Path] | None = None,
    ) -> tuple[CausalLMFamily, LMEvalData]:  # type: ignore[override]
        cls.check_taskset(cfg_model, cfg_taskset)
        experts = (to_plain(cfg_model.get("checkpoints")) or {}).get("finetuned") or {}
        if not isinstance(experts, Mapping) or not experts:
            raise MergeBenchError(
                "model.checkpoints.finetuned: no experts (a mapping {name: folder or hub id})"
            )
        tasks = [str(t) for t in (to_plain(cfg_taskset.get("tasks")) or [])]
        lm_options = check_options(to_plain(cfg_taskset.get("lm_eval")))
        manager = task_manager(cfg_taskset.get("include_path"), tasks)
        check_unsafe_code(manager, tasks, lm_options)
        mapping = expert_tasks(list(experts), tasks, to_plain(cfg_taskset.get("expert_tasks")))
        options = dict(to_plain(cfg_model.get("options")) or {})
        inputs = {str(e): TaskInputs(0, {s: [] for s in SPLITS}) for e in experts}
        family = construct(cls, "model.options", inputs, pretrained, specs={}, **options)
        return family, LMEvalData(family, tasks, manager, mapping, lm_options)

    # -- the pool: the checkpoints as they are --------------------------------------------
    def pool_sources(
        self, finetuned: Mapping[str, Path]
    ) -> tuple[TensorReader, dict[str, TensorReader]]:
        self.expert_paths = dict(finetuned)
        pretrained = open_checkpoint(self.pretrained_path, role="pretrained")
        return pretrained, {
            e: open_checkpoint(p, role=f"finetuned[{e}]") for e, p in finetuned.items()
        }

    def exclude_patterns(self, cfg_model: Mapping[str, Any]) -> list[str]:
        return [str(p) for p in (to_plain(cfg_model.get("exclude")) or [])]


def expert_tasks(
    experts: Sequence[str], tasks: Sequence[str], explicit: Mapping[str, Any] | None
) -> dict[str, str]:
    """Board task -> the expert that is `individual` on it: `explicit` ({expert: task or
    [tasks]}) where given, else the expert named like the task."""
    if explicit is None:
        return {t: t for t in tasks if t in experts}
    if not isinstance(explicit, Mapping):
        raise MergeBenchError("taskset.expert_tasks: expected a mapping {expert: task or [tasks]}")
    mapping: dict[str, str] = {}
    for expert, named in explicit.items():
        option = f"taskset.expert_tasks.{expert}"
        if expert not in experts:
            raise MergeBenchError(
                f"{option}: no expert {expert!r} in model.checkpoints.finetuned "
                f"({', '.join(experts)})"
            )
        for task in [named] if isinstance(named, str) else list(named or []):
            if task not in tasks:
                raise MergeBenchError(f"{option}: task {task!r} is not in taskset.tasks")
            if task in mapping:
                raise MergeBenchError(
                    f"{option}: task {task!r} already belongs to expert {mapping[task]!r}"
                )
            mapping[str(task)] = str(expert)
    return mapping


class CheckpointRow:
    """A reference row of whole checkpoints: per board task, the folder whose model scores
    it (None: the row has no score there)."""

    def __init__(self, paths: Mapping[str, Path | None]) -> None:
        self.paths = dict(paths)

    def path_for(self, task: str) -> Path | None:
        return self.paths.get(task)

    def state_dict(self, task: str) -> dict[str, torch.Tensor]:
        path = self.path_for(task)
        if path is None:
            raise MergeBenchError(f"task {task!r}: this reference row has no model for it")
        return open_checkpoint(path).state_dict()


class LMEvalData:
    """The evaluator's side of `taskset=lm_eval` (see the module docstring)."""

    def __init__(
        self,
        family: CausalLMFamily,
        tasks: Sequence[str],
        manager: Any,
        expert_of: Mapping[str, str],
        options: Mapping[str, Any],
    ) -> None:
        self.family = family
        self._tasks = list(tasks)
        self.manager = manager
        self.expert_of = dict(expert_of)
        self.options = dict(options)
        self._merged: dict[tuple[int, torch.dtype], nn.Module] = {}
        self._holds: tuple[Any, str | None] | None = None  # (result, task) the model holds
        self._switcher: TaskSwitcher | None = None
        self._checkpoint: tuple[Path, nn.Module, Any] | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    # -- reference rows ---------------------------------------------------------------------
    def reference_kinds(self) -> tuple[str, ...]:
        return ("individual", "pretrained", *(f"expert:{e}" for e in self.family.tasks))

    def reference(self, kind: str) -> CheckpointRow:
        family = self.family
        if kind == "pretrained":
            return CheckpointRow({t: family.pretrained_path for t in self._tasks})
        if kind == "individual":
            return CheckpointRow({t: family.expert_paths[e] for t, e in self.expert_of.items()})
        expert = kind.removeprefix("expert:")
        if kind.startswith("expert:") and expert in family.expert_paths:
            return CheckpointRow({t: family.expert_paths[expert] for t in self._tasks})
        raise MergeBenchError(f"reference row {kind!r}: choose from {self.reference_kinds()}")

    # -- scoring ----------------------------------------------------------------------------
    def sample_scores(
        self, result: Any, task: str, split: str, batch_size: int
    ) -> SampleScores | None:
        """lm-eval's score of `result` on `task` with each sample's value; None where a
        reference row has no model for the task."""
        if split != EVAL_SPLIT:
            raise MergeBenchError(
                f"eval.split: {split!r}: taskset=lm_eval scores each task's own lm-eval split "
                "(eval.split=test); a method's validation search needs protocol.select=false"
            )
        if task not in self._tasks:
            raise MergeBenchError(f"task {task!r} is not in taskset.tasks ({self._tasks})")
        if isinstance(result, CheckpointRow):
            path = result.path_for(task)
            if path is None:
                return None
            model, tokenizer = self._checkpoint_model(path)
        elif isinstance(result, MergeResult):
            model, tokenizer = self._merged_model(result, task)
        else:
            raise MergeBenchError(
                f"taskset=lm_eval scores merge results and checkpoints, not a {type(result).__name__}"
            )
        return score_task(model, tokenizer, task, self.manager, self.options, batch_size)

    def _checkpoint_model(self, path: Path) -> tuple[nn.Module, Any]:
        """A checkpoint with its own config and tokenizer (the last one kept loaded)."""
        if self._checkpoint is None or self._checkpoint[0] != path:
            from transformers import AutoModelForCausalLM

            self._checkpoint = None  # free the previous model first
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
            model = model.to(self.family.device).eval()
            self._checkpoint = (path, model, self._tokenizer(path))
        return self._checkpoint[1], self._checkpoint[2]

    def _tokenizer(self, folder: Path) -> Any:
        from transformers import AutoTokenizer

        own = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
        return AutoTokenizer.from_pretrained(folder if own else self.family.pretrained_path)

    def _merged_model(self, result: MergeResult, task: str) -> tuple[nn.Module, Any]:
        """The base architecture holding `result`'s weights for `task` (loaded once for a
        single model, switched in place per task for a task-conditioned one)."""
        expert = self.expert_of.get(task)
        conditioned = isinstance(result, TaskConditionedResult)
        if conditioned and expert is None:
            raise MergeBenchError(
                f"taskset.expert_tasks: task {task!r} has no expert, and {result.method} gives "
                "one model per expert (name an expert after the task or map one to it)"
            )
        model, tokenizer = self._base_model(result)
        weights = expert if conditioned else None
        if self._holds != (result, weights):
            self._holds = None
            if conditioned:
                if (
                    self._switcher is None
                    or self._switcher.result is not result
                    or (self._switcher.model is not model)
                ):
                    self._switcher = TaskSwitcher(result, model, aliases=_aliases(model))
                self._switcher.switch(str(expert))
            else:
                self._switcher = None
                _load(model, result.state_dict(expert))
            self._holds = (result, weights)
        return model, tokenizer

    def _base_model(self, result: MergeResult) -> tuple[nn.Module, Any]:
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        base = self.family.pretrained_path
        config = AutoConfig.from_pretrained(base)
        vocab = result.extra.get("vocab") or {}
        tokenizer_folder = base
        if vocab.get("policy") == "union":
            config.vocab_size = max(vocab["rows"].values())
            tokenizer_folder = self.family.expert_paths.get(vocab.get("tokenizer"), base)
        dtype = parse_out_dtype(result.extra.get("out_dtype")) or _config_dtype(config)
        key = (int(config.vocab_size), dtype)
        if key not in self._merged:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            if (base / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(base)
            self._merged[key] = model.to(self.family.device).eval()
            self._holds = None
        return self._merged[key], self._tokenizer(tokenizer_folder)


def _config_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _aliases(model: nn.Module) -> set[str]:
    """State dict names that share their tensor with an earlier name (tied embeddings)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    aliases = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in seen:
            aliases.add(name)
        seen.add(ident)
    return aliases


def _load(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """`state` into `model`; a tied output matrix may be absent (it is the embedding)."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in missing if k not in _aliases(model)]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise MergeBenchError(
            f"the merged weights do not fit the base model's architecture ({what}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected keys)"
        )


__all__ = ["CausalLMFamily", "CheckpointRow", "LMEvalData", "expert_tasks"]
