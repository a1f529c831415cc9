"""Time the data-dependent methods (RegMean, Fisher, AdaMerging, ++ and ++ w/ M&R) on the
embedded task sets with their benchmark presets (conf/variant/<name>.yaml), merge only.

    python scripts/time_data_methods.py                     # the zoo's models (must exist)
    python scripts/time_data_methods.py --synthetic         # no zoo: perturbed copies
    python scripts/time_data_methods.py --sets vision --variants adamerging --override method.steps=20

`--synthetic` replaces each fine-tuned model by the pretrained one plus small noise and a
random head: the cost of these methods depends on the shapes, the data and the number of
steps, not on the weights, so the timings hold for the real zoo (the merged models don't).
Prints a table and, with `--out`, writes it as Markdown.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

VARIANTS = ["regmean", "fisher", "adamerging", "adamerging_pp", "adamerging_pp_mr"]
SETS = {"text": "bench_text", "vision_vit": "bench_vision_vit", "vision": "bench_vision"}


def synthetic_pool(family, cfg_model, name: str, seed: int = 0):
    """Pretrained weights plus N(0, 1e-3) noise per task, each with a fresh random head."""
    from mergebench.engine.pool import ModelPool

    pre = family.pretrained_state()
    generator = torch.Generator().manual_seed(seed)
    finetuned = {}
    for task in family.tasks:
        state = family.build_model(task).state_dict()
        for key, value in pre.items():
            noise = torch.randn(value.shape, generator=generator) * 1e-3
            state[key] = value + noise if value.is_floating_point() else value
        finetuned[task] = state
    exclude = list(cfg_model.get("exclude") or [r"classifier\..*"])
    return ModelPool.from_checkpoints(pre, finetuned, exclude=exclude, family=family, name=name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--synthetic", action="store_true", help="no zoo: perturbed copies")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--out", type=Path, help="write the table as Markdown here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.table import Table

    from mergebench.api import merge_pool
    from mergebench.sources import load_family
    from mergebench.sources.zoo import family_dir, zoo_pool
    from mergebench.util.config import compose_config
    from mergebench.util.memory import PeakRSS

    rows = []
    for set_name in args.sets:
        # Overrides may name method options, so every config includes a variant.
        base = compose_config(
            [f"+experiment={SETS[set_name]}", f"+variant={args.variants[0]}", *args.override]
        )
        cfg_model = OmegaConf.to_container(base.model, resolve=True)
        cfg_taskset = OmegaConf.to_container(base.taskset, resolve=True)
        family, data = load_family(cfg_model, cfg_taskset, int(base.seed))
        name = f"{cfg_model['name']}/{cfg_taskset['name']}"
        if args.synthetic:
            pool = synthetic_pool(family, cfg_model, name)
        else:
            plain = OmegaConf.to_container(base, resolve=True)
            pool = zoo_pool(cfg_model, cfg_taskset, family_dir(plain), family, data)
        for variant in args.variants:
            cfg = compose_config(
                [f"+experiment={SETS[set_name]}", f"+variant={variant}", *args.override]
            )
            params = OmegaConf.to_container(cfg.method, resolve=True)
            method = params.pop("name")
            print(f"{name}: {variant} ...", file=sys.stderr, flush=True)
            with PeakRSS() as rss:
                start = time.perf_counter()
                merge_pool(method, pool, progress=True, **params)
                seconds = time.perf_counter() - start
            rows.append((name, variant, len(pool.tasks), seconds, rss.peak / 2**20))
            print(f"{name}: {variant} took {seconds / 60:.1f} min", file=sys.stderr, flush=True)

    table = Table(title="data-dependent methods: merge cost (benchmark presets)")
    for column in ("set", "variant", "tasks", "minutes", "peak RSS MiB"):
        table.add_column(column)
    for name, variant, tasks, seconds, rss in rows:
        table.add_row(name, variant, str(tasks), f"{seconds / 60:.1f}", f"{rss:.0f}")
    Console().print(table)
    if args.out:
        lines = [
            f"Measured with `python scripts/time_data_methods.py"
            f"{' --synthetic' if args.synthetic else ''}` on {torch.get_num_threads()} threads.",
            "",
            "| set | variant | tasks | minutes | peak RSS MiB |",
            "| --- | --- | --- | --- | --- |",
            *(f"| {n} | {v} | {t} | {s / 60:.1f} | {r:.0f} |" for n, v, t, s, r in rows),
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
