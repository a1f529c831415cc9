"""Peak memory of a merge whose largest tensor is an LLM embedding: a bf16 pool of a
32000x2048 embedding (65.5M entries, 250 MiB in float32) plus 2 TinyLlama-shaped layers,
base + 3 experts, merged from the files into a saved artifact, each method in a fresh
process (`bench_depth.run`). Prints peak RSS and its excess over the stream's own buffers
in float32 copies of the embedding; all figures also go to outputs/bench_wide.json.

    .venv/bin/python scripts/bench_wide.py                        # breadcrumbs della
    .venv/bin/python scripts/bench_wide.py --methods task_arithmetic breadcrumbs
"""

from __future__ import annotations

import argparse
import json

from bench_depth import ROOT, machine, make_pool, mib, run

VOCAB, HIDDEN, MLP, LAYERS = 32000, 2048, 5632, 2
OPTIONS: dict[str, dict] = {}


def shapes() -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            out[f"{prefix}self_attn.{name}_proj.weight"] = (HIDDEN, HIDDEN)
        out[f"{prefix}mlp.gate_proj.weight"] = (MLP, HIDDEN)
        out[f"{prefix}mlp.up_proj.weight"] = (MLP, HIDDEN)
        out[f"{prefix}mlp.down_proj.weight"] = (HIDDEN, MLP)
        out[f"{prefix}input_layernorm.weight"] = (HIDDEN,)
    out["model.norm.weight"] = (HIDDEN,)
    return out


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["breadcrumbs", "della"])
    parser.add_argument("--tasks", type=int, default=3)
    args = parser.parse_args()
    pre, finetuned = make_pool(f"wide{args.tasks}", shapes(), torch.bfloat16, args.tasks)
    copy = VOCAB * HIDDEN * 4  # one float32 copy of the embedding
    rows = []
    for method in args.methods:
        result = run(method, "stream", pre, finetuned, OPTIONS.get(method, {}))
        rows.append({"method": method, "measured": machine(short=True), **result})
        print(f"{method}: peak RSS {mib(result['peak_rss'])} MiB "
              f"({(result['peak_rss'] - result['rss_after_import']) / copy:.1f} embedding copies "
              f"over import), {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, "
              f"load {result['load']:.1f}", flush=True)  # fmt: skip
    out = ROOT / "outputs" / "bench_wide.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
