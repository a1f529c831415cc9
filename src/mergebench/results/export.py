"""A merge result as a `save_pretrained` folder, loadable without mergebench.

`export_result(RESULT_DIR, OUT_DIR)` writes what `AutoModelForCausalLM.from_pretrained`
reads: the base checkpoint's `config.json` (its dtype set to the output dtype, its
`vocab_size` to the merged rows under `vocab: union`) and its generation config, the
tokenizer files of the base (under `vocab: union`, of the expert whose tokenizer defines
the extra rows), the weights as safetensors shards with a Hugging Face index, and a
README.md model card. The base folder is the one the result recorded (`extra
["checkpoints"]`, written by `mergebench.merge`; a task-conditioned result also records its
pretrained files).

The folder is written beside OUT_DIR under a temporary name and renamed into place: a
failure leaves nothing half-written. An existing non-empty OUT_DIR is refused unless
`force` (then replaced whole).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.llm import parse_out_dtype
from mergebench.results.kinds import MergeResult, SingleModelResult, TaskConditionedResult
from mergebench.results.loading import load_result
from mergebench.results.shards import DEFAULT_SHARD_BYTES, Entry, dtype_of, shape_of, write_tensors
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import (
    TEMP_MARKER,
    make_marked_temp_dir,
    publish_tree,
    remove_stale_temp_dirs,
)
from mergebench.util.hashing import format_digest
from mergebench.util.version import __version__

# Files of a model folder copied as they are: the generation defaults and the tokenizer.
CONFIG_FILES = ("generation_config.json",)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def export_result(
    result_dir: str | Path,
    out_dir: str | Path,
    task: str | None = None,
    all_tasks: bool = False,
    force: bool = False,
    shard_size: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write the result's model (of `task`; every task into `out_dir/<task>` with
    `all_tasks`) as `save_pretrained` folders; returns them."""
    result_dir = Path(result_dir).expanduser()
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    result = load_result(result_dir)
    if task is not None and all_tasks:
        raise MergeBenchError("export: give --task or --all-tasks, not both")
    if task is not None and task not in result.tasks:
        raise MergeBenchError(f"{result_dir}: no task {task!r} (tasks: {', '.join(result.tasks)})")
    if isinstance(result, TaskConditionedResult) and task is None and not all_tasks:
        raise MergeBenchError(
            f"{result_dir}: {result.method} gives one model per task; pass --task "
            f"(one of {', '.join(result.tasks)}) or --all-tasks"
        )
    base = _base_folder(result, result_dir)
    # The card names the digest of the base tensors a task-conditioned result recorded, as
    # "<algorithm>:<hex>" (BLAKE3 since format version 4, sha256 before).
    meta = _read_json(result_dir / "result.json")
    digest = meta.get("pretrained_digest")
    if digest:
        digest = f"{format_digest(meta.get('format_version', 1))}:{digest}"
    _check_target(out_dir, force)
    if not all_tasks:
        _publish(
            out_dir, force, lambda tmp: write_model(result, task, base, tmp, shard_size, digest)
        )
        return [out_dir]

    def write_all(tmp: Path) -> None:
        for name in result.tasks:
            (tmp / name).mkdir()
            write_model(result, name, base, tmp / name, shard_size, digest)

    for name in result.tasks:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise MergeBenchError(f"{result_dir}: task {name!r} cannot name a folder")
    _publish(out_dir, force, write_all)
    return [out_dir / name for name in result.tasks]


def write_model(
    result: MergeResult,
    task: str | None,
    base: Path,
    folder: Path,
    shard_size: int,
    digest: str | None = None,
) -> None:
    """The `save_pretrained` files of `result.state_dict(task)` into the existing `folder`."""
    out_dtype = parse_out_dtype(result.extra.get("out_dtype"))
    tensors = _tensors(result, task)

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        if out_dtype is not None and tensor.is_floating_point():
            return tensor.to(out_dtype)
        return tensor

    entries = []
    for key in tensors:
        if isinstance(tensors, _LazyState):
            shape, dtype = tensors.shape(key), tensors.dtype(key)
        else:
            shape, dtype = tuple(tensors[key].shape), tensors[key].dtype
        if out_dtype is not None and dtype.is_floating_point:
            dtype = out_dtype
        entries.append(Entry(key, tuple(shape), dtype))
    write_tensors(folder, "model", entries, lambda key: cast(tensors[key]).contiguous(),
                  shard_size, metadata={"format": "pt"})  # fmt: skip
    vocab = result.extra.get("vocab") or {}
    config = _read_json(_config_folder(result, task, base) / "config.json")
    dtypes = {e.dtype for e in entries if e.dtype.is_floating_point}
    if len(dtypes) == 1:
        name = str(dtypes.pop()).removeprefix("torch.")
        for field in [f for f in ("dtype", "torch_dtype") if f in config] or ["dtype"]:
            config[field] = name
    if vocab.get("policy") == "union" and isinstance(config.get("vocab_size"), int):
        config["vocab_size"] = max(vocab["rows"].values())
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _copy(base, folder, CONFIG_FILES)
    _copy(_tokenizer_folder(result, base), folder, TOKENIZER_FILES)
    (folder / "README.md").write_text(model_card(result, task, base, digest))


def _tensors(result: MergeResult, task: str | None) -> Mapping[str, torch.Tensor]:
    """The weights of `task`, read lazily for a single model (one tensor at a time)."""
    if isinstance(result, SingleModelResult):
        return _LazyState(result, task)
    return result.state_dict(task)


class _LazyState(Mapping[str, torch.Tensor]):
    """`SingleModelResult.state_dict(task)` without reading every tensor up front."""

    def __init__(self, result: SingleModelResult, task: str | None) -> None:
        self._parts: dict[str, tuple[Mapping[str, torch.Tensor], str]] = {
            key: (result.shared, key) for key in result.shared
        }
        for key in result.task_specific.get(task, {}) if task is not None else {}:
            self._parts[key] = (result.task_specific[task], key)
        for alias, key in (result.extra.get("tied_keys") or {}).items():
            if key in self._parts:
                self._parts[alias] = self._parts[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        tensors, name = self._parts[key]
        return tensors[name]

    def __iter__(self):
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def shape(self, key: str) -> tuple[int, ...]:
        tensors, name = self._parts[key]
        return shape_of(tensors, name)

    def dtype(self, key: str) -> torch.dtype:
        tensors, name = self._parts[key]
        return dtype_of(tensors, name)


def _base_folder(result: MergeResult, result_dir: Path) -> Path:
    recorded = (result.extra.get("checkpoints") or {}).get("pretrained") or []
    meta = _read_json(result_dir / "result.json")
    pretrained = meta.get("pretrained") if isinstance(meta.get("pretrained"), dict) else {}
    files = recorded or pretrained.get("files") or []
    if not files or not isinstance(files, list):
        raise MergeBenchError(
            f"{result_dir}: records no base checkpoint folder (merged from an in-memory state "
            "dict?); export needs the base's save_pretrained folder"
        )
    folder = Path(files[0]).parent
    if not (folder / "config.json").is_file():
        raise MergeBenchError(
            f"{folder}: base checkpoint of {result_dir} has no config.json; export needs a "
            "save_pretrained folder"
        )
    return folder


def _config_folder(result: MergeResult, task: str | None, base: Path) -> Path:
    """The base's folder, unless the task keeps heads of its own (a classifier): then its
    fine-tune's, whose config describes that head (`num_labels`, `id2label`, architecture)."""
    if task is None or not result.task_specific.get(task):
        return base
    files = (result.extra.get("checkpoints") or {}).get("finetuned", {}).get(task) or []
    folder = Path(files[0]).parent if files else None
    if folder is None or not (folder / "config.json").is_file():
        raise MergeBenchError(
            f"export: task {task!r} keeps its own head, but its fine-tune's folder (with the "
            "config.json that describes the head) is not recorded or has no config.json"
        )
    return folder


def _tokenizer_folder(result: MergeResult, base: Path) -> Path:
    vocab = result.extra.get("vocab") or {}
    if vocab.get("policy") != "union":
        return base
    files = (result.extra.get("checkpoints") or {}).get("finetuned", {}).get(vocab["tokenizer"])
    if not files:
        raise MergeBenchError(
            f"vocab: union: the tokenizer's expert {vocab['tokenizer']!r} has no recorded folder"
        )
    return Path(files[0]).parent


def _copy(source: Path, folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise MergeBenchError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise MergeBenchError(f"{path}: expected a JSON object")
    return value


def model_card(result: MergeResult, task: str | None, base: Path, digest: str | None = None) -> str:
    """README.md: what was merged, how, from what, by which mergebench."""
    checkpoints = result.extra.get("checkpoints") or {}
    finetuned = checkpoints.get("finetuned") or {}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, mergebench]",
        "---",
        "",
        f"# {result.method} merge" + (f" (task {task})" if task is not None else ""),
        "",
        f"Merged with [mergebench](https://pypi.org/project/mergebench/) {__version__}, "
        f"method `{result.method}`.",
        "",
        "## Options",
        "",
        "```json",
        json.dumps(result.params, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Models",
        "",
        f"- base: `{base}`",
    ]
    if digest:
        lines.append(f"  - digest of its tensors the merge applied the deltas to: `{digest}`")
    for name in result.tasks:
        files = finetuned.get(name) or []
        where = f"`{Path(files[0]).parent}`" if files else "(in-memory state dict)"
        lines.append(f"- expert `{name}`: {where}")
    for key, label in (("vocab", "vocabulary"), ("out_dtype", "output dtype"),
                       ("tied_keys", "tied keys")):  # fmt: skip
        if key in result.extra:
            lines.append(f"- {label}: `{json.dumps(result.extra[key], sort_keys=True)}`")
    return "\n".join(lines) + "\n"


def _check_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeBenchError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise MergeBenchError(f"{out_dir}: exists and is not empty; pass --force to replace it")


def _publish(out_dir: Path, force: bool, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a marked temp folder beside `out_dir`, then rename it into place."""
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(parent, out_dir.name)
        tmp = make_marked_temp_dir(parent, f".{out_dir.name}.tmp-")
    except OSError as err:
        raise MergeBenchError(f"{out_dir}: cannot write here ({err.strerror or err})") from None
    try:
        write(tmp)
        (tmp / TEMP_MARKER).unlink()
        publish_tree(tmp)
        if out_dir.exists():  # empty, or replaced with --force: moved away whole
            old = make_marked_temp_dir(parent, f".{out_dir.name}.old-")
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MergeBenchError(
            f"{out_dir}: cannot write the export ({err.strerror or err})"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def push_to_hub(folder: Path, repo: str) -> str:
    """Upload `folder` to the hub model repository `repo`; returns the commit URL."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as err:  # network, auth, a missing repository: one line
        text = str(err).strip().splitlines()
        raise MergeBenchError(
            f"--push-to-hub {repo}: upload failed ({text[0] if text else type(err).__name__})"
        ) from None
    return str(getattr(info, "commit_url", info))
