"""`mergebench-convert`: a torch checkpoint file to a safetensors state dict.

    mergebench-convert ViT-B-32/EuroSAT/finetuned.pt eurosat.safetensors --trust-pickle

A `.pt` file that holds a state dict (tensors only) is read with `torch.load(weights_only=True)`
and needs no flag. The task_vectors release (the paper's open_clip checkpoints) instead saved
whole modules with `torch.save(model)`: loading those unpickles Python objects, which runs
code stored in the file, so it is refused unless `--trust-pickle` is given. Classes the file
names that no longer exist here (task_vectors' `src.modeling.ImageEncoder`, renamed open_clip
internals) are read as plain `nn.Module`s: only their tensors are kept.

Key names: the module's state dict. task_vectors' `ImageEncoder` wraps the open_clip model as
`.model`, so its keys read `model.visual.conv1.weight`; the `model.` prefix (`--strip-prefix`)
is removed when every key has it, which gives the names of `open_clip.create_model(<arch>)`
(`visual.conv1.weight`), the ones the `openclip_*` families read.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from mergebench.util.fs import atomic_save_safetensors

PROGRAM = "mergebench-convert"
PICKLE_WARNING = (
    f"{PROGRAM}: warning: unpickling {{path}} runs code stored in the file; go on only with "
    "files from a source you trust"
)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _stub(module: str, name: str) -> type:
    """A stand-in for a class that cannot be imported: an `nn.Module` that accepts anything,
    so a pickled module still yields its parameters and buffers."""
    from torch import nn

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)

    return type(name, (nn.Module,), {"__module__": module, "__init__": __init__})


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _stub(module, name)


# `torch.load(pickle_module=...)` wants a module with Unpickler and load.
lenient_pickle = types.ModuleType("mergebench_lenient_pickle")
lenient_pickle.Unpickler = _LenientUnpickler  # type: ignore[attr-defined]
lenient_pickle.load = lambda file, **kw: _LenientUnpickler(file, **kw).load()  # type: ignore[attr-defined]


class Refused(Exception):
    """The file cannot be converted as asked: one line says why (no traceback)."""


def _weights_only_refusal(err: BaseException) -> bool:
    """Whether torch refused the file because it pickles objects besides tensors (the one
    case where --trust-pickle can help); garbage fails differently ("invalid load key")."""
    text = str(err)
    return "weights_only" in text or "Unsupported global" in text


def _tensors(obj: Any) -> dict[str, Any] | None:
    """The state dict in `obj` (a module, a state dict, or one wrapped as `state_dict`)."""
    import torch
    from torch import nn

    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    return None


def load_state(path: Path, trust_pickle: bool) -> dict[str, Any]:
    """The state dict stored in `path`; unpickles objects only with `trust_pickle`."""
    import torch

    from mergebench.engine.checkpoints import describe_non_torch_file

    what = describe_non_torch_file(path)
    if what is not None:
        raise Refused(f"{path}: {what}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's advice about weights_only is ours to give
            state = _tensors(torch.load(path, map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError, EOFError) as err:
        if not _weights_only_refusal(err):
            raise Refused(f"{path}: not a readable torch checkpoint ({_first_line(err)})") from None
        if not trust_pickle:
            raise Refused(
                f"{path} is a pickled Python object (such as a whole module saved with "
                "torch.save(model)), not a plain state dict, and unpickling it would run code "
                "stored in the file; rerun with --trust-pickle only if you trust its source"
            ) from err
        print(PICKLE_WARNING.format(path=path), file=sys.stderr)
        state = _tensors(
            torch.load(path, map_location="cpu", weights_only=False, pickle_module=lenient_pickle)
        )
    if not state:
        raise ValueError(f"{path} holds neither a module nor a state dict of tensors")
    return state


DEFAULT_PREFIX = "model."


def strip_prefix(state: dict[str, Any], prefix: str, required: bool = False) -> dict[str, Any]:
    """`state` without `prefix` on its keys, when every key has it. Otherwise unchanged, or,
    when the user asked for this prefix (`required`), refused: a file written unchanged
    would look converted as asked."""
    if prefix and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    if prefix and required:
        lacking = next(k for k in state if not k.startswith(prefix))
        raise Refused(
            f"--strip-prefix: {prefix!r} is not on every key (e.g. {lacking!r}), so nothing "
            "would be stripped; give the prefix every key starts with, or '' to keep the keys"
        )
    return state


def convert(
    source: Path,
    target: Path,
    trust_pickle: bool,
    prefix: str = DEFAULT_PREFIX,
    prefix_required: bool = False,
) -> int:
    """Write `source`'s state dict to `target` (safetensors); returns the number of tensors.
    `target` is either the complete new file or as it was."""
    state = strip_prefix(load_state(source, trust_pickle), prefix, prefix_required)
    # safetensors refuses tensors that share memory (tied weights): store a copy of each.
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    try:  # through a temp file beside `target` that any failure (Ctrl-C too) removes
        atomic_save_safetensors(target, tensors, {"format": "pt", "converted_from": source.name})
    except OSError as err:  # disk full, permissions: the target is at fault, not the source
        raise Refused(f"{target}: cannot write ({err.strerror or _first_line(err)})") from None
    return len(tensors)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Convert a torch checkpoint (a state dict, or a whole pickled module such "
        "as the task_vectors release's finetuned.pt) into a safetensors state dict.",
    )
    parser.add_argument("source", type=Path, help="the .pt / .pth / .bin file")
    parser.add_argument("target", type=Path, help="the .safetensors file to write")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling Python objects (runs code from the file; trusted files only)",
    )
    parser.add_argument(
        "--strip-prefix",
        default=None,
        help="removed from every key; an error if some key lacks it. Default: 'model.' (the "
        "wrapper of task_vectors' ImageEncoder) when every key has it; '' keeps the keys",
    )
    parser.add_argument("--force", action="store_true", help="replace the target file if it exists")
    return parser


def _fail(message: str) -> NoReturn:
    print(f"{PROGRAM}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _check_target(target: Path, force: bool) -> None:
    if target.is_dir():
        _fail(f"{target}: is a folder; give the .safetensors file to write")
    if target.suffix != ".safetensors":
        _fail(f"{target}: the target must be a .safetensors file")
    if target.exists() and not force:
        _fail(f"{target}: exists; pass --force to replace it")
    if target.parent.exists() and not os.access(target.parent, os.W_OK):
        _fail(f"{target.parent}: cannot write here (permission denied)")


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except KeyboardInterrupt:  # the temp file is already gone (convert's cleanup)
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        sys.exit(130)


def _main(argv: list[str] | None) -> None:
    args = _parser().parse_args(argv)
    if not args.source.is_file():
        _fail(f"{args.source}: no such file")
    _check_target(args.target, args.force)
    prefix = DEFAULT_PREFIX if args.strip_prefix is None else args.strip_prefix
    try:
        count = convert(
            args.source,
            args.target,
            args.trust_pickle,
            prefix,
            prefix_required=args.strip_prefix is not None,
        )
    except Refused as err:
        _fail(str(err))
    except Exception as err:  # a broken or foreign file: one line, not a traceback
        _fail(f"{args.source}: cannot convert ({type(err).__name__}: {_first_line(err)})")
    print(f"{PROGRAM}: wrote {count} tensors to {args.target}")


if __name__ == "__main__":  # pragma: no cover
    main()
