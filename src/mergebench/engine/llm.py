"""Causal language models in a pool: tied embeddings, vocabulary sizes, the output dtype.

`prepare_pool` returns the pool seen through views (`engine.views`) and notes recorded in
the result's `extra`:

- **Tied embeddings.** The output matrix (`lm_head.weight`) of a model with
  `tie_word_embeddings` is its input embedding. A checkpoint stores it once
  (`save_pretrained` keeps only `model.embed_tokens.weight`) or twice sharing storage (a
  `model.state_dict()`, a `.bin` file). Either way the pair is merged once: the shared
  copy is hidden, and when the base stores both keys the result lists the output key as
  an alias (`extra["tied_keys"]`) and writes it again. A tied expert of an untied base
  serves its embedding as its `lm_head.weight`; an untied expert of a tied base is
  refused in one line (its output matrix would have nowhere to go).
- **Vocabulary.** Vocabulary keys are the weights and biases of modules named
  `embed_tokens`, `lm_head`, `wte` or `word_embeddings` whose first dimension is the base
  config's `vocab_size` (any first dimension when no `config.json` lies beside the base).
  An expert with more rows than the base: `vocab="base"` reads only the base's rows (its
  extra rows are dropped, counted per expert); `vocab="union"` keeps every row, the extra
  ones being the mean over the experts that have them (the base and every expert read them
  as that mean, so their task vectors there are zero and every method returns the mean).
  An expert with fewer rows than the base is refused in one line.
- **Output dtype.** Merges compute in float32 and write the base's dtype; `out_dtype`
  chooses another (a view of the base declaring it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.checkpoints import SafetensorsReader, TensorReader
from mergebench.engine.pool import ModelPool
from mergebench.engine.views import DtypeView, KeyView, RowsView
from mergebench.util.errors import MergeBenchError

VOCAB_POLICIES = ("base", "union")
VOCAB_KEY = re.compile(r"(?:^|.*\.)(?:embed_tokens|lm_head|wte|word_embeddings)\.(?:weight|bias)")
_INPUT_EMBEDDING = re.compile(r"(?:^|.*\.)(?:embed_tokens|wte|word_embeddings)\.weight")
_OUTPUT_EMBEDDING = re.compile(r"(?:^|.*\.)lm_head\.weight")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def parse_out_dtype(value: Any) -> torch.dtype | None:
    """`out_dtype`: None (or `base`) keeps the base model's dtype."""
    if value is None or value == "base":
        return None
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    name = str(value).removeprefix("torch.").lower() if isinstance(value, str | torch.dtype) else ""
    if name not in _DTYPES:
        raise MergeBenchError(
            f"out_dtype: {value!r} is not an output dtype (use base, float32, bfloat16 or float16)"
        )
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_vocab(vocab: Any) -> str:
    if vocab not in VOCAB_POLICIES:
        raise MergeBenchError(f"vocab: {vocab!r} is not a vocabulary policy (use base or union)")
    return vocab


def checkpoint_folder(source: TensorReader) -> Path | None:
    """The folder of a checkpoint's files (a `save_pretrained` folder), if it has files."""
    inner = source
    while hasattr(inner, "inner"):
        inner = inner.inner
    files = inner.files()
    return files[0].parent if files else None


def read_config(folder: Path | None) -> dict[str, Any]:
    """`config.json` beside a checkpoint, or {} (none, or unreadable: names alone decide)."""
    if folder is None or not (folder / "config.json").is_file():
        return {}
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise MergeBenchError(f"{folder / 'config.json'}: not readable JSON ({err})") from None
    return config if isinstance(config, dict) else {}


def prepare_pool(
    pool: ModelPool,
    vocab: str = "base",
    out_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[ModelPool, dict[str, Any]]:
    """The pool through the views the module docstring describes, and the notes for the
    result's `extra` (empty when nothing applied)."""
    check_vocab(vocab)
    notes: dict[str, Any] = {}
    pool = _tie(pool, notes)
    pool = _vocabulary(pool, vocab, notes, progress)
    if out_dtype is not None:
        notes["out_dtype"] = dtype_name(out_dtype)
        pool = dataclasses.replace(pool, pretrained=DtypeView(pool.pretrained, out_dtype))
    return pool, notes


# -- tied embeddings ---------------------------------------------------------------------------
def _one_name(pattern: re.Pattern[str], keys: set[str]) -> str | None:
    found = sorted(k for k in keys if pattern.fullmatch(k))
    return found[0] if len(found) == 1 else None


def _tied_state(source: TensorReader, embed: str, head: str) -> str:
    """`single` (the output key not stored), `shared` (stored twice, one storage), `untied`."""
    if head not in source:
        return "single"
    if embed not in source or isinstance(_base_source(source), SafetensorsReader):
        return "untied"  # safetensors cannot share storage: two stored copies are two weights
    a, b = source.get(embed), source.get(head)
    same = (
        a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )
    return "shared" if same else "untied"


def _base_source(source: TensorReader) -> TensorReader:
    while hasattr(source, "inner"):
        source = source.inner
    return source


def _tie(pool: ModelPool, notes: dict[str, Any]) -> ModelPool:
    sources = [pool.pretrained, *pool.finetuned.values()]
    keys = set().union(*(s.keys() for s in sources))
    embed, head = _one_name(_INPUT_EMBEDDING, keys), _one_name(_OUTPUT_EMBEDDING, keys)
    if embed is None or head is None or embed not in pool.pretrained:
        return pool
    base_state = _tied_state(pool.pretrained, embed, head)
    states = {t: _tied_state(s, embed, head) for t, s in pool.finetuned.items()}
    if all(state == "untied" for state in [base_state, *states.values()]):
        return pool
    if base_state == "untied":  # tied experts read their embedding as their output matrix
        finetuned = {
            t: KeyView(s, aliases={head: embed}) if states[t] == "single" else s
            for t, s in pool.finetuned.items()
        }
        return dataclasses.replace(pool, finetuned=finetuned)
    for task, state in states.items():
        if state == "untied":
            raise MergeBenchError(
                f"{pool.finetuned[task].name}: stores its own {head!r} (untied), but "
                f"{pool.pretrained.name} ties it to {embed!r}; merge experts of the same kind"
            )
    if base_state == "shared":
        notes["tied_keys"] = {head: embed}

    def hide(source: TensorReader, state: str) -> TensorReader:
        return KeyView(source, hidden={head}) if state == "shared" else source

    return dataclasses.replace(
        pool,
        pretrained=hide(pool.pretrained, base_state),
        finetuned={t: hide(s, states[t]) for t, s in pool.finetuned.items()},
    )


# -- vocabulary --------------------------------------------------------------------------------
def vocab_keys(source: TensorReader) -> list[str]:
    """The vocabulary keys of a base checkpoint (see the module docstring)."""
    size = read_config(checkpoint_folder(source)).get("vocab_size")
    keys = []
    for key in source.keys():
        if not VOCAB_KEY.fullmatch(key) or not source.shape(key):
            continue
        if isinstance(size, int) and source.shape(key)[0] != size:
            continue
        keys.append(key)
    return keys


def _vocabulary(pool: ModelPool, vocab: str, notes: dict[str, Any], progress: bool) -> ModelPool:
    pre = pool.pretrained
    extra: dict[str, dict[str, int]] = {}  # task -> key -> its row count, where above the base
    for key in vocab_keys(pre):
        base_rows, trail = pre.shape(key)[0], tuple(pre.shape(key)[1:])
        for task, source in pool.finetuned.items():
            if key not in source or tuple(source.shape(key)[1:]) != trail:
                continue  # the key plan names a missing key or another shape
            rows = source.shape(key)[0]
            if rows < base_rows:
                raise MergeBenchError(
                    f"{source.name}: vocabulary key {key!r} has {rows} rows, the base "
                    f"{pre.name} {base_rows}; an expert with fewer rows cannot be merged"
                )
            if rows > base_rows:
                extra.setdefault(task, {})[key] = rows
    if not extra:
        return pool
    if vocab == "base":
        return _keep_base_rows(pool, extra, notes, progress)
    return _union_rows(pool, extra, notes, progress)


def _keep_base_rows(
    pool: ModelPool, extra: Mapping[str, Mapping[str, int]], notes: dict[str, Any], progress: bool
) -> ModelPool:
    pre = pool.pretrained
    dropped: dict[str, int] = {}
    finetuned = dict(pool.finetuned)
    for task, keys in extra.items():
        rows = {k: (pre.shape(k)[0], pre.shape(k)[0]) for k in keys}
        finetuned[task] = RowsView(pool.finetuned[task], rows)
        dropped[task] = max(n - pre.shape(k)[0] for k, n in keys.items())
        if progress:
            key, n = max(keys.items(), key=lambda item: item[1])
            print(
                f"vocab: base: {pool.finetuned[task].name} has {n} rows in {key!r}, the base "
                f"{pre.shape(key)[0]}: its {dropped[task]} extra rows are dropped",
                file=sys.stderr,
                flush=True,
            )
    base_rows = {k: pre.shape(k)[0] for keys in extra.values() for k in keys}
    notes["vocab"] = {"policy": "base", "rows": base_rows, "dropped_rows": dropped}
    return dataclasses.replace(pool, finetuned=finetuned)


def _union_rows(
    pool: ModelPool, extra: Mapping[str, Mapping[str, int]], notes: dict[str, Any], progress: bool
) -> ModelPool:
    pre = pool.pretrained
    tokenizer_task = _check_extra_tokens(pool, extra)
    keys = sorted({k for per_task in extra.values() for k in per_task})
    rows: dict[str, tuple[int, int]] = {}
    fill: dict[str, torch.Tensor] = {}
    for key in keys:
        base_rows = pre.shape(key)[0]
        total = max(per_task.get(key, base_rows) for per_task in extra.values())
        # Row r of the union: the mean over the experts that have row r.
        summed = torch.zeros((total - base_rows, *pre.shape(key)[1:]))
        count = torch.zeros(total - base_rows)
        for task, per_task in extra.items():
            if key in per_task:
                have = per_task[key] - base_rows
                block = torch.empty((have, *pre.shape(key)[1:]))
                pool.finetuned[task].read_rows_into(key, block, start=base_rows)
                summed[:have] += block
                count[:have] += 1
        fill[key] = summed / count.view(-1, *([1] * (summed.dim() - 1)))
        rows[key] = (base_rows, total)
    finetuned = {t: RowsView(s, rows, fill) for t, s in pool.finetuned.items()}
    added = {t: max(n - pre.shape(k)[0] for k, n in per.items()) for t, per in extra.items()}
    notes["vocab"] = {
        "policy": "union",
        "rows": {k: total for k, (_, total) in rows.items()},
        "base_rows": {k: keep for k, (keep, _) in rows.items()},
        "extra_rows": added,
        "tokenizer": tokenizer_task,
    }
    if progress:
        print(
            f"vocab: union: {', '.join(f'{t} +{n}' for t, n in added.items())} extra rows kept "
            f"(tokenizer of {tokenizer_task})",
            file=sys.stderr,
            flush=True,
        )
    return dataclasses.replace(pool, pretrained=RowsView(pre, rows, fill), finetuned=finetuned)


def _check_extra_tokens(pool: ModelPool, extra: Mapping[str, Mapping[str, int]]) -> str:
    """The task whose tokenizer defines every extra row (the expert with the most rows);
    refuse when two experts give one extra row id different tokens."""
    tasks = sorted(extra, key=lambda t: -max(extra[t].values()))
    if len(tasks) == 1:
        return tasks[0]
    base_rows = min(pool.pretrained.shape(k)[0] for per in extra.values() for k in per)
    tokens = {}
    for task in tasks:
        folder = checkpoint_folder(pool.finetuned[task])
        found = tokens_by_id(folder)
        if found is None:
            raise MergeBenchError(
                f"{pool.finetuned[task].name}: vocab: union needs its tokenizer files to check "
                "that the experts with extra rows define the same tokens; none found"
            )
        tokens[task] = {i: t for i, t in found.items() if i >= base_rows}
    first = tasks[0]
    for task in tasks[1:]:
        for row, token in sorted(tokens[task].items()):
            if row in tokens[first] and tokens[first][row] != token:
                raise MergeBenchError(
                    f"vocab: union: row {row} is token {tokens[first][row]!r} in "
                    f"{pool.finetuned[first].name} but {token!r} in {pool.finetuned[task].name}"
                )
    return first


def tokens_by_id(folder: Path | None) -> dict[int, str] | None:
    """Token id -> token of the tokenizer in `folder` (`tokenizer.json`, else `vocab.json`
    with `added_tokens.json`), or None when it has none."""
    if folder is None:
        return None
    found: dict[int, str] = {}
    try:
        if (folder / "tokenizer.json").is_file():
            data = json.loads((folder / "tokenizer.json").read_text())
            vocab = (data.get("model") or {}).get("vocab") or {}
            if isinstance(vocab, dict):
                found.update({int(i): str(t) for t, i in vocab.items()})
            elif isinstance(vocab, list):  # Unigram: [token, score] by id
                found.update({i: str(entry[0]) for i, entry in enumerate(vocab)})
            for token in data.get("added_tokens") or []:
                found[int(token["id"])] = str(token["content"])
            return found
        if (folder / "vocab.json").is_file():
            vocab = json.loads((folder / "vocab.json").read_text())
            found.update({int(i): str(t) for t, i in vocab.items()})
            if (folder / "added_tokens.json").is_file():
                added = json.loads((folder / "added_tokens.json").read_text())
                found.update({int(i): str(t) for t, i in added.items()})
            return found
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        raise MergeBenchError(f"{folder}: tokenizer files not readable ({err})") from None
    return None
