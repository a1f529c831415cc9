"""Memory of a files-to-artifact merge against the model's depth, and one large merge.

`depth`: pools of a pretrained model and 4 fine-tuned ones made of `L` float32 matrices of
2048x2048 (16 MiB each; L = 8 and 48 by default), merged by every data-free method from the
files into a saved artifact, each in a fresh process: once streamed
(`merge(..., output_dir=...)`: each tensor is written as it is finished) and, for EMR and
TIES, once the pre-streaming way (`merge(...)` in memory, then `result.save(...)`). The
figure that matters is how peak RSS grows from 8 to 48 layers (+640 MiB of weights per
model): the target is less than 200 MiB for every data-free method.

`large`: a bf16 pool with the tensor shapes of a Llama-style 3B model (`--preset`), 2 tasks
by default, merged streamed by task arithmetic and EMR: time and peak RSS.

Pools are cached under ~/.cache/mergebench/bench_depth (written tensor by tensor with the
engine's own `ShardedWriter`). Tables go to docs/performance.md between markers, all
figures to outputs/bench_depth.json.

    .venv/bin/python scripts/bench_depth.py depth                 # every data-free method
    .venv/bin/python scripts/bench_depth.py depth --methods emr ties
    .venv/bin/python scripts/bench_depth.py large --preset llama-3b --tasks 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergebench" / "bench_depth"
)
OUT_JSON = ROOT / "outputs" / "bench_depth.json"
DOC = ROOT / "docs" / "performance.md"
SIDE = 2048
TASKS = 4
# Settings that make a method run on these pools, or run in reasonable time: WUDI's Adam
# steps and the SVD methods' cost grow with the matrices, not with what memory holds.
OPTIONS: dict[str, dict] = {
    "lines": {"layer_pattern": r"layers\.(\d+)\..*"},
    "wudi": {"steps": 5},  # default 300: same memory (one matrix's optimizer state), 60x time
}
PRESETS = {
    # Llama-3.2-3B: hidden 3072, 28 layers, MLP 8192, 24 heads / 8 KV heads of 128, vocab 128256.
    "llama-3b": dict(hidden=3072, layers=28, mlp=8192, kv=1024, vocab=128256),
    "llama-1b": dict(hidden=2048, layers=16, mlp=8192, kv=512, vocab=128256),
    "llama-7b": dict(hidden=4096, layers=32, mlp=11008, kv=4096, vocab=32000),
}

DRIVER = r"""
import json, os, sys, time, resource
import mergebench
from mergebench.results import artifact_bytes
spec = json.loads(sys.argv[1])
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
imported = rss("VmRSS:")
cpu0, wall0 = os.times(), time.perf_counter()
kw = dict(progress=False, **spec["options"])
if spec["mode"] == "stream":
    result = mergebench.merge(spec["method"], spec["pre"], spec["finetuned"],
                              output_dir=spec["out"], **kw)
else:
    result = mergebench.merge(spec["method"], spec["pre"], spec["finetuned"], **kw)
    result.save(spec["out"])
wall = time.perf_counter() - wall0
cpu1 = os.times()
print(json.dumps({"wall_s": wall, "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
                  "peak_rss": rss("VmHWM:"), "rss_after_import": imported,
                  "artifact_bytes": artifact_bytes(spec["out"])}))
"""


def data_free_methods() -> list[str]:
    from mergebench.methods.registry import build_method, method_names

    return sorted(n for n in method_names() if not build_method(n).needs_data)


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], dtype, seed: int,
                     base: Path | None, std: float) -> None:  # fmt: skip
    """A checkpoint written tensor by tensor: seeded random weights, or `base` plus seeded
    random deltas of `std`."""
    import torch

    from mergebench.engine.checkpoints import open_checkpoint
    from mergebench.results.shards import Entry, ShardedWriter

    if path.exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    source = open_checkpoint(base) if base else None
    generator = torch.Generator().manual_seed(seed)
    entries = [Entry(k, s, dtype) for k, s in shapes.items()]
    with ShardedWriter(tmp, "model", entries, shard_bytes=2 * 10**9) as writer:
        for key, shape in shapes.items():
            if source is None:
                tensor = torch.randn(shape, generator=generator).mul_(0.02)
            else:
                tensor = (
                    source.get(key).float().add_(torch.randn(shape, generator=generator), alpha=std)
                )
            writer.write(key, tensor.to(dtype))
    tmp.rename(path)


def make_pool(
    name: str, shapes: dict[str, tuple[int, ...]], dtype, tasks: int
) -> tuple[str, dict[str, str]]:
    folder = CACHE / name
    pre = folder / "pretrained"
    print(f"pool {name}: pretrained", flush=True)
    write_checkpoint(pre, shapes, dtype, seed=0, base=None, std=0.0)
    finetuned = {}
    for t in range(tasks):
        print(f"pool {name}: task {t}", flush=True)
        path = folder / f"task{t}"
        write_checkpoint(path, shapes, dtype, seed=t + 1, base=pre, std=1e-3 * (1 + t / 4))
        finetuned[f"task{t}"] = str(path)
    return str(pre), finetuned


def run(method: str, mode: str, pre: str, finetuned: dict[str, str], options: dict) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-depth-", dir=CACHE)) / "artifact"
    spec = dict(
        method=method, mode=mode, pre=pre, finetuned=finetuned, out=str(out), options=options
    )
    load = os.getloadavg()[0]
    try:
        done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], capture_output=True,
                              text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"{method} ({mode}) failed:\n{done.stderr[-3000:]}")
        return {**json.loads(done.stdout.strip().splitlines()[-1]), "load": load}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def machine(short: bool = False) -> str:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?"
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    if short:
        return f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {commit}"
    return (f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, {cpu}, {os.cpu_count()} cores, "
            f"{mem:.0f} GiB RAM; Python {platform.python_version()}, torch {torch.__version__}")  # fmt: skip


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def depth(args) -> None:
    """Each finished method is saved at once (outputs/bench_depth.json, and the docs block
    re-rendered from every row stored there), so a long sweep can stop and resume with
    `--methods` naming the rest: a new measurement of a method replaces its old row."""
    import torch

    pools = {}
    for layers in args.layers:
        shapes = {f"layers.{i}.weight": (SIDE, SIDE) for i in range(layers)}
        pools[layers] = make_pool(f"L{layers}", shapes, torch.float32, TASKS)
    stored = load_json().get("depth", {}).get("rows", [])
    for method in args.methods:
        modes = ["stream", "in-memory"] if method in args.compare else ["stream"]
        for mode in modes:
            row = {"method": method, "mode": mode, "measured": machine(short=True)}
            for layers in args.layers:
                pre, finetuned = pools[layers]
                print(f"{method} ({mode}), {layers} layers ...", flush=True)
                row[str(layers)] = run(method, mode, pre, finetuned, OPTIONS.get(method, {}))
                print(f"  peak RSS {mib(row[str(layers)]['peak_rss'])} MiB, "
                      f"{row[str(layers)]['wall_s']:.1f} s", flush=True)  # fmt: skip
            stored = [r for r in stored if (r["method"], r["mode"]) != (method, mode)] + [row]
            save_json("depth", stored)
            write_block("bench_depth", depth_table(stored, args.layers))


def depth_table(rows: list[dict], layers: list[int]) -> str:
    lo, hi = (str(x) for x in (min(layers), max(layers)))
    order = {m: i for i, m in enumerate(data_free_methods())}
    rows = sorted(rows, key=lambda r: (order.get(r["method"], 99), r["mode"] != "stream"))
    lines = [
        f"Machine: {machine(short=False).split(', ', 2)[2]}. Pool: pretrained + {TASKS} tasks, L "
        f"float32 matrices of {SIDE}x{SIDE} (16 MiB each, so +{(int(hi) - int(lo)) * 16} MiB per "
        f"model from {lo} to {hi} layers), in the page cache; each cell one fresh process, files "
        "to saved artifact. Peak RSS includes what importing torch costs (column `import`). "
        "`measured`: when and at which commit the row was measured; `load`: the 1-minute load "
        "average as the 48-layer run started (the machine was shared).",
        "",
        f"| method | way | peak RSS MiB, {lo} layers | peak RSS MiB, {hi} layers | growth MiB | "
        f"< 200 MiB | wall s ({hi}) | CPU s ({hi}) | import MiB | load | measured |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if lo not in row or hi not in row:
            continue
        a, b = row[lo], row[hi]
        growth = b["peak_rss"] - a["peak_rss"]
        ok = ("yes" if growth < 200 * 2**20 else "no") if row["mode"] == "stream" else "(before)"
        note = " (steps=5)" if row["method"] == "wudi" else ""
        lines.append(
            f"| {row['method']}{note} | {row['mode']} | {mib(a['peak_rss'])} | {mib(b['peak_rss'])} | "
            f"{growth / 2**20:+,.0f} | {ok} | {b['wall_s']:.1f} | {b['cpu_s']:.1f} | "
            f"{mib(b['rss_after_import'])} | {b['load']:.1f} | {row.get('measured', '')} |"
        )
    lines += ["", "`in-memory`: `merge(...)` then `result.save(...)`, the way every merge ran before "
              "streamed artifacts (the whole output held until saved). `wudi` runs 5 Adam steps "
              "instead of 300 here: its memory is one matrix's optimizer state either way."]  # fmt: skip
    return "\n".join(lines)


def large(args) -> None:
    import torch

    p = PRESETS[args.preset]
    h, kv, mlp = p["hidden"], p["kv"], p["mlp"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (p["vocab"], h)}
    for i in range(p["layers"]):
        base = f"model.layers.{i}."
        shapes.update({
            base + "self_attn.q_proj.weight": (h, h), base + "self_attn.k_proj.weight": (kv, h),
            base + "self_attn.v_proj.weight": (kv, h), base + "self_attn.o_proj.weight": (h, h),
            base + "mlp.gate_proj.weight": (mlp, h), base + "mlp.up_proj.weight": (mlp, h),
            base + "mlp.down_proj.weight": (h, mlp), base + "input_layernorm.weight": (h,),
            base + "post_attention_layernorm.weight": (h,),
        })  # fmt: skip
    shapes["model.norm.weight"] = (h,)
    params = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    pre, finetuned = make_pool(
        f"{args.preset}-bf16-{args.tasks}", shapes, torch.bfloat16, args.tasks
    )
    rows = []
    for method in args.methods:
        print(f"{method} on {args.preset} ...", flush=True)
        rows.append({"method": method, **run(method, "stream", pre, finetuned, {})})
        print(f"  peak RSS {mib(rows[-1]['peak_rss'])} MiB, {rows[-1]['wall_s']:.0f} s", flush=True)
    lines = [
        f"Measured {machine()}. Pool: {args.preset}-shaped ({params / 1e9:.2f}B parameters, "
        f"{len(shapes)} tensors, bf16, {params * 2 / 2**30:.1f} GiB per checkpoint), pretrained + "
        f"{args.tasks} tasks; streamed (`output_dir=`), fresh process each, checkpoints read from "
        "disk (the pool does not fit the page cache beside the artifact).",
        "",
        "| method | wall s | CPU s | peak RSS MiB | artifact GiB | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {mib(r['peak_rss'])} | "
                     f"{r['artifact_bytes'] / 2**30:.1f} | {r['load']:.1f} |")  # fmt: skip
    write_block("bench_large", "\n".join(lines))
    save_json("large", rows)


def write_block(name: str, body: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = DOC.read_text()
    if begin not in text:
        raise SystemExit(f"{DOC}: no {begin} marker")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(f"{head}{begin}\n{body}\n{end}{tail}")
    print(f"wrote the {name} block of {DOC}")


def load_json() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}


def save_json(key: str, rows: list) -> None:
    data = load_json()
    data[key] = {"machine": machine(), "rows": json.loads(json.dumps(rows, default=str))}
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("depth")
    d.add_argument("--methods", nargs="+", default=None)
    d.add_argument("--layers", nargs=2, type=int, default=[8, 48])
    d.add_argument("--compare", nargs="*", default=["emr", "ties"], help="also run these in memory")
    g = sub.add_parser("large")
    g.add_argument("--preset", choices=sorted(PRESETS), default="llama-3b")
    g.add_argument("--tasks", type=int, default=2)
    g.add_argument("--methods", nargs="+", default=["task_arithmetic", "emr"])
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.mode == "depth":
        args.methods = args.methods or data_free_methods()
        depth(args)
    else:
        large(args)


if __name__ == "__main__":
    main()
