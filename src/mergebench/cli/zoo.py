"""`mergebench-zoo`: build (once, cached) the offline zoo of fine-tuned models."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mergebench.bench.job import zoo_reference_records
from mergebench.evaluation import average
from mergebench.families import family_class
from mergebench.sources.zoo import ensure_zoo, say
from mergebench.util.config import compose_config, group_options, load_group
from mergebench.util.errors import MergeBenchError

# What `make zoo` builds: the text set and the ViT vision set (`make bench`'s boards);
# `vision` (EfficientNet-Lite0) is built for `make bench-all` (`--set` names it).
DEFAULT_SETS = ("text", "vision_vit")


def zoo_model(cfg_taskset: Mapping[str, Any]) -> str:
    """The zoo model config (`conf/model/*.yaml`, `source: zoo`) whose family kind the task
    set names in `family:`; several: the user picks one with `model=NAME`."""
    kind = cfg_taskset.get("family")
    zoo_models = [
        m for m in group_options("model") if load_group("model", m).get("source") == "zoo"
    ]
    models = [m for m in zoo_models if family_class(load_group("model", m)).kind == kind]
    if len(models) != 1:
        found = f"zoo models {', '.join(models)} all serve" if models else "no zoo model serves"
        raise MergeBenchError(
            f"taskset.family: {found} family {kind!r} of task set "
            f"{cfg_taskset.get('name')!r} (name one: model=NAME)"
        )
    return models[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mergebench-zoo",
        description="Build (once, cached) the offline zoo: fine-tuned models per task and a "
        "multi-task model, for each task set, and the benchmark's reference rows (references=false: "
        "not). Extra KEY=VALUE arguments are Hydra overrides "
        "of the mergebench config (e.g. model.finetune.epochs=1).",
    )
    parser.add_argument("--set", dest="sets", nargs="+", default=list(DEFAULT_SETS),
                        help="task sets to build (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--cache-dir",
        help="zoo cache folder (default $MERGEBENCH_CACHE/zoo or ~/.cache/mergebench/zoo)",
    )
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument("--no-multitask", action="store_true", help="skip the multi-task models")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. seed=1")
    args = parser.parse_args(argv)
    try:
        # `--set text seed=1` hands the override to --set: move KEY=VALUE items back.
        args.overrides = [s for s in args.sets if "=" in s] + list(args.overrides)
        args.sets = [s for s in args.sets if "=" not in s]
        own_model = any(o.startswith("model=") for o in args.overrides)
        configs = {}
        for name in args.sets:  # every set and override checked before any training starts
            model = [] if own_model else [f"model={zoo_model(load_group('taskset', name))}"]
            overrides = [f"taskset={name}", *model, *args.overrides]
            if args.cache_dir:
                overrides.append(f"zoo.dir={args.cache_dir}")
            configs[name] = compose_config(overrides)
        for name, cfg in configs.items():
            start = time.perf_counter()
            directory = ensure_zoo(
                cfg, progress=not args.no_progress, force=args.force,
                multitask=False if args.no_multitask else None,
            )  # fmt: skip
            if cfg.get("references", True):
                # Once per zoo: the benchmark's reference rows (individual, multi-task,
                # pretrained on the test split), cached in <zoo>/references/.
                rows = zoo_reference_records(cfg, progress=not args.no_progress)
                averages = ", ".join(f"{r.label} {100 * average(r.scores):.1f}" for r in rows)
                say(f"{name}: reference rows ({cfg['eval']['split']}) {averages}")
            say(f"{name}: zoo ready in {directory} ({time.perf_counter() - start:.0f} s)")
    except MergeBenchError as exc:
        print(f"mergebench-zoo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
