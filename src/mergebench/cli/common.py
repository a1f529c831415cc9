"""What every entry point shares: a user error is one line on stderr and exit code 2;
Ctrl-C is one line and exit code 130."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from mergebench.util.config import group_options, load_group
from mergebench.util.errors import MergeBenchError, first_line

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# `python -m mergebench.cli.<module>` has the module's file as argv[0].
_PROGRAMS = {
    "": "mergebench",
    "-c": "mergebench",
    "bench.py": "mergebench",
    "merge.py": "mergebench-merge",
    "experiments.py": "mergebench-experiment",
}


def fail(program: str, message: str) -> NoReturn:
    print(f"{program}: error: {first_line(Exception(message))}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def run_hydra_app(app: Callable[[], Any], program: str | None = None) -> None:
    """Run a Hydra app. Hydra's own errors (bad override, missing value, unknown config) and
    ours become one line `<program>: error: ...` and exit 2 (Hydra prints several lines and
    exits 1); Ctrl-C becomes `<program>: interrupted` and exit 130, not a traceback."""
    program = program or _PROGRAMS.get(Path(sys.argv[0]).name, Path(sys.argv[0]).name)
    # Hydra prints (not raises) errors unless HYDRA_FULL_ERROR is set: let them reach us.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _check_number_lengths(sys.argv[1:])
        app()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            sys.exit(exit_.code if exit_.code == EXIT_INTERRUPTED else EXIT_USAGE)
        raise
    except KeyboardInterrupt as err:  # its text, if any, says what was completed
        print(f"{program}: interrupted" + (f" ({err})" if str(err) else ""), file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except MergeBenchError as err:
        fail(program, str(err))
    except Exception as err:
        if isinstance(err, OSError) and _is_run_folder_error(err):
            fail(
                program,
                f"{err.filename}: cannot create the run folder ({err.strerror or err}); run "
                "from a folder you can write to, or set hydra.run.dir=<a writable folder>",
            )
        if not _is_config_error(err):
            raise  # a bug: keep its traceback
        fail(program, _config_message(err))
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def _check_number_lengths(overrides: Sequence[str]) -> None:
    """Hydra's override parser calls int() on a long digit string and Python refuses more
    than `sys.get_int_max_str_digits()` digits with a ValueError deep in the parser: name
    the override instead."""
    limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    for override in overrides:
        key, sep, value = override.partition("=")
        digits = value.strip().lstrip("+-").replace("_", "")
        if sep and limit and digits.isdigit() and len(digits) > limit:
            raise MergeBenchError(
                f"{key.lstrip('+~')}: a number of {len(digits)} digits (at most {limit})"
            )


@contextmanager
def no_run_folder_on_failure() -> Iterator[None]:
    """Hydra writes its run folder (`.hydra/` configs, `<job>.log`) before the app's code
    runs: a command that then fails or is interrupted removes it again, so a refused command
    leaves nothing behind (a run folder holding anything else is kept)."""
    try:
        yield
    except BaseException as err:
        if not (isinstance(err, SystemExit) and err.code in (0, None)):
            _discard_run_folder()
        raise


def _discard_run_folder() -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.RUN:  # a multirun's folder holds the other jobs too
        return
    folder = Path(hydra_cfg.runtime.output_dir)
    hydra_own = {hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log"}
    if not folder.is_dir() or any(p.name not in hydra_own for p in folder.iterdir()):
        return
    _close_log_files_in(folder)
    shutil.rmtree(folder, ignore_errors=True)
    # The parents Hydra created for it (`outputs/merge/`), while empty, up to the working folder.
    cwd, parent = Path.cwd().resolve(), folder.resolve().parent
    while cwd in parent.parents:
        try:
            parent.rmdir()
        except OSError:  # not empty: someone else's
            break
        parent = parent.parent


def _close_log_files_in(folder: Path) -> None:
    """Detach the logging handlers Hydra opened on the job's log in `folder`: once the folder
    is gone, a later log line in this process (a notebook or a test calling the command
    again; transformers' warnings) would try to reopen it and fail."""
    import logging

    inside = folder.resolve()
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            path = getattr(handler, "baseFilename", None)
            if path is not None and inside in Path(path).resolve().parents:
                logger.removeHandler(handler)
                handler.close()


def _is_run_folder_error(err: OSError) -> bool:
    """Whether `err` is Hydra failing to create or write its run folder (a read-only working
    folder, say), not an error of the app's own code. Hydra has reset its config by the time
    the error reaches us, so the traceback tells: the frame right below Hydra's `run_job` is
    then Hydra's own (`mkdir`, `_save_config`), not the task function."""
    import traceback

    frames = [frame.f_code for frame, _ in traceback.walk_tb(err.__traceback__)]
    for outer, inner in zip(frames, frames[1:], strict=False):
        if outer.co_name == "run_job" and "hydra" in outer.co_filename:
            return inner.co_name in {"mkdir", "_save_config", "makedirs"}
    return False


def _is_config_error(err: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(err, HydraException | OmegaConfBaseException)


_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def _config_message(err: BaseException) -> str:
    text = str(err).strip()
    override = getattr(err, "override", None)  # hydra's OverrideParseException
    if isinstance(override, str):
        reason = text.splitlines()[0] if text else "cannot parse it"
        return f"{override}: not a valid override ({reason})"
    match = _OVERRIDE.search(text)
    if match:
        key = match.group(1)
        if "." in key:
            return f"{key}: no such setting"
        return f"{key}: no such setting (a method option goes under method., e.g. method.{key}=...)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    message = lines[0]
    if message.startswith("In '") and "': " in message:  # "In 'merge': Could not find ..."
        message = message.split("': ", 1)[1]
    if len(lines) > 1 and lines[1].startswith("Available options"):
        options = []
        for line in lines[2:]:
            if line.endswith(":"):
                break
            options.append(line)
        message += f" (choose from {', '.join(options)})"
    return message


def method_params(method_cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    params = OmegaConf.to_container(method_cfg, resolve=True)
    if not isinstance(params, dict) or "name" not in params:
        raise MergeBenchError("method: expected a method config (method=<name>)")
    return str(params.pop("name")), params


def require_values(cfg: DictConfig, keys: tuple[str, ...]) -> None:
    """Fail before any work when a mandatory (`???`) value was not given."""
    for key in keys:
        if OmegaConf.is_missing(cfg, key):
            raise MergeBenchError(f"{key}: missing value (add {key}=... to the command line)")


def method_options() -> dict[str, list[str]]:
    """Option name -> the methods that have it (from `conf/method/*.yaml`)."""
    owners: dict[str, list[str]] = {}
    for name in group_options("method"):
        for option in load_group("method", name):
            if option != "name":
                owners.setdefault(option, []).append(name)
    return owners


def hydra_overrides() -> list[str]:
    """The command line's overrides of the running Hydra app (empty outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def check_top_level_keys(
    cfg: DictConfig,
    known: Collection[str] | None = None,
    overrides: Sequence[str] | None = None,
) -> None:
    """A method option given at the top level (`+k=0.1`, as Hydra's hint suggests) would be
    ignored silently: make it an error saying `method.k=0.1`.

    `known`: the app's top-level keys; any other key of `cfg` is then an error too (the
    `mergebench-merge` app). Without it (the `mergebench` app, whose experiments add keys),
    only keys added with `+`/`++` on the command line that name a method option fail.
    Call it first thing in the app, e.g. `check_top_level_keys(cfg)` in `cli/bench.py`."""
    selected = str(cfg.method.name) if "method" in cfg and "name" in cfg.method else None
    owners = method_options()

    def complain(key: str, value: str) -> NoReturn:
        methods = owners[key]
        if selected in methods:
            raise MergeBenchError(
                f"{key}: is an option of method {selected}, not a top-level setting; "
                f"write method.{key}={value}"
            )
        raise MergeBenchError(
            f"{key}: is not a top-level setting; it is an option of method "
            f"{', '.join(methods)} (write method={methods[0]} method.{key}={value})"
        )

    values: dict[str, str] = {}
    added: list[str] = []
    for override in hydra_overrides() if overrides is None else overrides:
        forced = override.startswith("++")  # may set an existing key: only checked with known
        if not override.startswith("+") or (forced and known is None):
            continue
        key, _, value = override.lstrip("+").partition("=")
        key = key.split("@")[0]
        if "." not in key and "/" not in key:
            added.append(key)
            values[key] = value
    for key in added:
        if key in owners and (known is None or key not in known):
            complain(key, values[key])
    if known is not None:
        for key in cfg:
            if key in known:
                continue
            if key in owners:
                complain(str(key), values.get(str(key), "..."))
            raise MergeBenchError(
                f"{key}: not a setting of this command (settings: {', '.join(sorted(known))})"
            )
