"""`mergebench-eval`: score a saved merge and store it as a row of the benchmark's board.

    mergebench-eval RESULT_DIR model=... taskset=... [--name NAME] [Hydra overrides]

RESULT_DIR is a mergebench result folder (any method; its row is named by its method and
options) or another tool's output in the family's format: a `save_pretrained` folder
(mergekit, FusionBench) or one safetensors file, whose row is `external (NAME)` (NAME: the
folder's name unless `--name`/`name=` says). The overrides are the benchmark's (`mergebench`):
model, taskset, seed, eval.split, store.path, label, force, references, logger, threads ...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir

from mergebench.bench.evaluate_saved import NOT_FOR_SAVED, run_saved
from mergebench.cli.common import check_top_level_keys, run_hydra_app
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError

PROGRAM = "mergebench-eval"
USAGE = f"usage: {PROGRAM} RESULT_DIR [--name NAME] [model=... taskset=... overrides]"


def parse_args(argv: Sequence[str]) -> tuple[str, str | None, list[str]]:
    """(RESULT_DIR, name, Hydra overrides) of the command line. The path is the first
    argument that is not an override (`key=value`), or one that exists on disk."""
    path: str | None = None
    name: str | None = None
    overrides: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--name":
            if not args:
                raise MergeBenchError("--name: missing value (--name NAME)")
            name = args.pop(0)
        elif arg.startswith(("--name=", "name=")):
            name = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise MergeBenchError(f"{arg}: unknown option ({USAGE})")
        elif path is None and ("=" not in arg or Path(arg).exists()):
            path = arg
        elif "=" not in arg:
            raise MergeBenchError(f"{arg}: a second RESULT_DIR ({USAGE})")
        else:
            overrides.append(arg)
    if path is None:
        raise MergeBenchError(f"RESULT_DIR: missing ({USAGE})")
    if name is not None and not name.strip():
        raise MergeBenchError("name: empty (give the row a name, e.g. --name my-merge)")
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("@", 1)[0]
        if key in NOT_FOR_SAVED:
            raise MergeBenchError(
                f"{key}: not a setting of {PROGRAM} (the saved merge has its own method)"
            )
    return path, name, overrides


def evaluate(argv: Sequence[str]) -> dict:
    """Run `mergebench-eval` on `argv` (the arguments after the program's name)."""
    path, name, overrides = parse_args(argv)
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=overrides)
    check_top_level_keys(cfg, overrides=overrides)
    return run_saved(cfg, path, name)


def main() -> None:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(__doc__.strip())
        return
    run_hydra_app(lambda: evaluate(sys.argv[1:]), PROGRAM)


if __name__ == "__main__":
    main()
