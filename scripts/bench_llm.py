"""LLM-shaped merges, measured: memory of a streamed merge whose largest key is an 8B model's
vocabulary, and (with a mergekit venv) mergebench beside mergekit on a TinyLlama-shaped pool.

Two pools, built once (random bf16 weights, seeded; a base and three experts, each a
`save_pretrained`-style folder with a Llama `config.json` and one `model.safetensors`):
- `embedding`: Llama-3.1-8B's shapes (vocabulary 128,256 x 4,096, untied `lm_head`, MLP
  14,336) with `--layers` decoder layers (default 1): 2.5 GB per model;
- `tinyllama`: TinyLlama-1.1B's shapes (22 layers, 2,048 wide, vocabulary 32,000): 2.2 GB
  per model.

Each merge runs in a fresh process; the table gives wall and CPU seconds (the kernel's
`wait4` rusage), the process's peak RSS (mergebench: the child's own `VmHWM`; mergekit:
`ru_maxrss`, the parent holding no weights) and, for mergebench, the merge's own peak above the
process's resident size when the merge started (everything a process holds after importing
torch and mergebench is not the merge's); the JSON rows add the merge's own user and system
seconds and minor page faults (`getrusage` around the merge alone). `tinyllama --mergekit PYTHON` runs the same
recipes (task arithmetic, TIES, DARE + TIES, DARE + task arithmetic, Breadcrumbs, DELLA)
with mergekit (`PYTHON -m mergekit.scripts.run_yaml`, its own venv) and with mergebench
(what `mergebench-merge mergekit=recipe.yml` runs), one after the other. Figures go to outputs/bench_llm_<pool>.json and, with
`--write-doc`, between markers in docs/performance.md.

    .venv/bin/python scripts/bench_llm.py embedding                  # ties + emr, ~10 min
    .venv/bin/python scripts/bench_llm.py tinyllama --mergekit /tmp/mk/bin/python
    .venv/bin/python scripts/bench_llm.py smoke --mergekit /tmp/mk/bin/python   # a toy pool
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import (  # noqa: E402  (a sibling script)
    machine_facts,
    measure_child,
    read_once_s,
    write_doc,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POOLS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergebench"
TASKS = ("a", "b", "c")
SHAPES = {
    # vocab, hidden, intermediate, heads, kv heads, layers (default)
    "embedding": (128_256, 4_096, 14_336, 32, 8, 1),
    "tinyllama": (32_000, 2_048, 5_632, 32, 4, 22),
    "smoke": (512, 64, 128, 4, 2, 2),  # the tinyllama runs on a toy pool: checks the script
}
# mergebench method and options per measured recipe (mergekit's granularity: per-tensor
# top-k). The mergekit recipe beside each is written by `recipe`.
RUNS = {
    "embedding": {
        "task_arithmetic": ("task_arithmetic", {"scaling": 0.3}),
        "ties_global": ("ties", {"k": 0.2, "topk_scope": "global"}),
        "emr": ("emr", {}),
        "ties_tensor": ("ties", {"k": 0.2, "topk_scope": "tensor"}),
    },
    # tinyllama: mergekit recipes (`RECIPES`), run by both tools (mergebench through
    # `mergebench.methods.mergekit_recipes`, the `mergebench-merge mergekit=` translation).
    "tinyllama": {
        name: ("recipe", {})
        for name in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della")
    },
}
# Recipe parameters as in issue 25's table: TIES k 0.2, DARE drop 0.9, mergekit's defaults
# for Breadcrumbs (density 0.9, gamma 0.01) and DELLA (epsilon 0.05 around density 0.1).
RECIPES = {
    "task_arithmetic": ({"weight": 0.3}, {}),
    "ties": ({"weight": 1.0, "density": 0.2}, {"normalize": True}),
    "dare_ties": ({"weight": 1.0, "density": 0.1}, {"normalize": True}),
    "dare_linear": ({"weight": 0.3, "density": 0.1}, {}),
    "breadcrumbs": ({"weight": 0.3, "density": 0.9, "gamma": 0.01}, {}),
    "della": ({"weight": 1.0, "density": 0.1, "epsilon": 0.05},
              {"normalize": True, "lambda": 1.0}),
}  # fmt: skip
RUNS["smoke"] = RUNS["tinyllama"]
MARKERS = {
    "embedding": ("<!-- bench_llm_embedding:begin -->", "<!-- bench_llm_embedding:end -->"),
    "tinyllama": ("<!-- bench_llm_tinyllama:begin -->", "<!-- bench_llm_tinyllama:end -->"),
}


# --- the pool -----------------------------------------------------------------------------
def llama_shapes(kind: str, layers: int) -> dict[str, tuple[int, ...]]:
    vocab, hidden, mlp, heads, kv_heads, _ = SHAPES[kind]
    kv = hidden // heads * kv_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (mlp, hidden),
            p + "mlp.up_proj.weight": (mlp, hidden),
            p + "mlp.down_proj.weight": (hidden, mlp),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })  # fmt: skip
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def build_pool(kind: str, layers: int, folder: Path) -> Path:
    """Base and experts, each written once (a stamp file says the pool is complete)."""
    pool = folder / f"llm-{kind}-{layers}"
    if (pool / "complete").exists():
        return pool
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    vocab, hidden, mlp, heads, kv_heads, _ = SHAPES[kind]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
        dtype="bfloat16",
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]  # mergekit reads the architecture from it
    shapes = llama_shapes(kind, layers)
    for index, name in enumerate(("base", *TASKS)):
        print(f"building {pool.name}/{name}", flush=True)
        target = pool / name
        target.mkdir(parents=True, exist_ok=True)
        config.to_json_file(target / "config.json")
        tensors = {}
        for k, (key, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(k)  # the base: the same draw in every model
            base = torch.randn(shape, generator=g).mul_(0.02)
            if index:
                delta = torch.Generator().manual_seed(1_000 * index + k)
                base.add_(torch.randn(shape, generator=delta).mul_(0.002))
            tensors[key] = base.to(torch.bfloat16)
            del base
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    (pool / "complete").write_text("")
    return pool


def recipe(name: str, pool: Path) -> dict:
    """The mergekit recipe `RECIPES[name]` on the pool (bf16 out, float32 arithmetic)."""
    models, parameters = RECIPES[name]
    return {
        "merge_method": name,
        "base_model": str(pool / "base"),
        "models": [{"model": str(pool / t), "parameters": dict(models)} for t in TASKS],
        "parameters": dict(parameters),
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


# --- one measured run (child process) -----------------------------------------------------
def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import mergebench

    pool = Path(args.pool)
    base, finetuned = str(pool / "base"), {t: str(pool / t) for t in TASKS}
    method, params = args.method, json.loads(args.params)
    if method == "recipe":  # what `mergebench-merge mergekit=recipe.yml` runs
        from mergebench.methods.mergekit_recipes import from_recipe

        run = from_recipe(recipe(params.pop("name"), pool))
        method, base, finetuned = run.method, run.pretrained, run.finetuned
        params = {**run.params, "out_dtype": run.out_dtype}
    # Once per process and timed apart (as `bench_merge.py`'s worker): the modules a merge
    # imports on its first call, numba's with its compiler state. The process's wall time
    # (the table's, against mergekit's) still counts them.
    began = time.perf_counter()
    import mergebench.api  # noqa: F401
    from mergebench.engine import kernels
    from mergebench.methods.registry import method_class

    method_class(method)
    kernels.warm_up()
    imports_s = time.perf_counter() - began
    before = _status("VmRSS")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    mergebench.merge(method, base, finetuned, progress=False, output_dir=args.out, **params)
    after = resource.getrusage(resource.RUSAGE_SELF)
    report = {
        "merge_s": time.perf_counter() - start,
        "merge_user_s": after.ru_utime - usage.ru_utime,
        "merge_system_s": after.ru_stime - usage.ru_stime,
        "merge_minor_faults": after.ru_minflt - usage.ru_minflt,
        "rss_before_bytes": before,
        "imports_s": imports_s,
        "vm_hwm_bytes": _status("VmHWM"),
    }
    print(json.dumps(report))


def write_once(artifact: Path) -> dict:
    """Seconds (wall, system) to write as many bytes as the artifact's files hold into a
    fresh file beside it (`pwrite`s of 16 MiB from one huge-page buffer), then removed: what
    putting the artifact into the page cache costs at this moment. On our VM a page the
    guest has not used for a while costs a fault on the host first (free page reporting):
    the same write takes 0.2-2.7 s per GB by that state alone."""
    from mergebench.results import artifact_bytes
    from mergebench.util.buffers import huge_page_array

    size = artifact_bytes(artifact)
    buffer = huge_page_array(1 << 24, "uint8")
    buffer[:] = 1
    scratch = artifact.parent / f"{artifact.name}.write-once"
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        written = 0
        while written < size:
            written += os.pwrite(fd, memoryview(buffer)[: size - written], written)
    finally:
        os.close(fd)
    wall = time.perf_counter() - start
    system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - usage.ru_stime
    scratch.unlink()
    return {"write_once_s": wall, "write_once_system_s": system, "artifact_bytes": size}


def write_once_run(artifact: Path) -> dict:
    """`write_once` in a child of its own, after the merge's (whose figures it must not
    touch), just as the artifact is there."""
    command = [sys.executable, __file__, "_write_once", "--out", str(artifact)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(command: list[str]) -> dict:
    """Run `command` in a fresh process: wall, CPU and peak RSS from the kernel."""
    report = measure_child(command, " ".join(command[:4]))
    report["wall_s"] = report.pop("process_s")
    if "vm_hwm_bytes" in report:
        report["merge_peak_above_start_bytes"] = report["vm_hwm_bytes"] - report["rss_before_bytes"]
    return report


def mergebench_run(pool: Path, method: str, params: dict, out: Path, threads: int) -> dict:
    command = [
        sys.executable, __file__, "_worker", "--pool", str(pool), "--method", method,
        "--params", json.dumps(params), "--out", str(out), "--threads", str(threads),
    ]  # fmt: skip
    return measure(command)


def mergekit_run(python: str, pool: Path, name: str, work: Path) -> dict:
    import yaml

    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(recipe(name, pool)))
    out = work / f"mergekit-{name}"
    command = [python, "-m", "mergekit.scripts.run_yaml", str(path), str(out),
               "--no-copy-tokenizer", "--lazy-unpickle"]  # fmt: skip
    return measure(command)


def warm(pool: Path) -> float:
    """Read every file once (page cache); returns the seconds one read took."""
    start = time.perf_counter()
    for path in sorted(pool.glob("*/model.safetensors")):
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
    return time.perf_counter() - start


# --- the table ----------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def render(results: dict) -> str:
    facts = results["machine"]
    lines = [
        f"Measured {facts['date']} at commit {facts.get('commit', 'unknown')} on {facts['cpu']} "
        f"({facts['cores']} cores, "
        f"{gib(facts['memory_bytes'])} GiB), torch {facts['torch']}, {results['threads']} "
        f"threads; pool `{results['pool']}` ({results['pool_gib']:.1f} GiB), page cache "
        f"warm (one read: {results['read_s']:.1f} s); load before each run in the table. "
        '"merge s": mergebench\'s merge alone (its process imported torch, mergebench and '
        'numba first; "wall s" counts them), against one read of the pool just before the '
        "row (`preadv` into a huge-page buffer, best of 3).",
        "",
        "| run | tool | wall s | merge s (x one read) | CPU s (system) | process peak RSS GiB "
        "| merge's own peak GiB | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        own = row.get("merge_peak_above_start_bytes")
        merge = (
            f"{row['merge_s']:.1f} ({row['merge_x_read']:.1f}x)" if "merge_x_read" in row else "-"
        )
        lines.append(
            f"| {row['run']} | {row['tool']} | {row['wall_s']:.0f} | {merge} | {row['cpu_s']:.0f} "
            f"({row['system_s']:.0f}) | {gib(row.get('vm_hwm_bytes', row['ru_maxrss_bytes']))} | "
            f"{gib(own) if own is not None else '-'} | {row['load_before']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("_worker")
    for name in ("pool", "method", "params", "out"):
        worker.add_argument(f"--{name}", required=True)
    worker.add_argument("--threads", type=int, default=2)
    sub.add_parser("_write_once").add_argument("--out", type=Path, required=True)
    for kind in SHAPES:
        build = sub.add_parser(f"_build_{kind}")
        build.add_argument("--layers", type=int, default=SHAPES[kind][5])
        build.add_argument("--pools", type=Path, default=DEFAULT_POOLS)
        run = sub.add_parser(kind)
        run.add_argument("--runs", nargs="+", default=list(RUNS[kind]), choices=list(RUNS[kind]))
        run.add_argument("--layers", type=int, default=SHAPES[kind][5])
        run.add_argument("--pools", type=Path, default=DEFAULT_POOLS)
        run.add_argument("--threads", type=int, default=2)
        run.add_argument("--mergekit", help="python of a venv with mergekit 0.1.5")
        run.add_argument("--write-doc", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "_worker":
        run_worker(args)
        return
    if args.command == "_write_once":
        print(json.dumps(write_once(args.out)))
        return
    if args.command.startswith("_build_"):
        build_pool(args.command.removeprefix("_build_"), args.layers, args.pools)
        return
    # Built in a child: a parent that held the weights would count in its children's
    # `ru_maxrss` (a forked child starts with the parent's resident pages).
    subprocess.run([sys.executable, __file__, f"_build_{args.command}", "--layers",
                    str(args.layers), "--pools", str(args.pools)], check=True)  # fmt: skip
    pool = args.pools / f"llm-{args.command}-{args.layers}"
    size = sum(p.stat().st_size for p in pool.glob("*/model.safetensors"))
    results = {
        "pool": pool.name, "pool_gib": size / 2**30, "threads": args.threads,
        "machine": machine_facts(args.threads), "read_s": warm(pool), "rows": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.pools) as work:
        for name in args.runs:
            method, params = RUNS[args.command][name]
            if method == "recipe":
                params = {"name": name}
            print(f"mergebench {name} ...", flush=True)
            out = Path(work) / f"mergebench-{name}"
            read = read_once_s(pool, pattern="*/model.safetensors")
            row = {"read_once_s": read, **mergebench_run(pool, method, params, out, args.threads)}
            row["merge_x_read"] = row["merge_s"] / read
            row.update(write_once_run(out))
            results["rows"].append({"run": name, "tool": "mergebench", **row})
            print(json.dumps(results["rows"][-1]), flush=True)
            if args.mergekit and args.command != "embedding":
                print(f"mergekit {name} ...", flush=True)
                row = mergekit_run(args.mergekit, pool, name, Path(work))
                results["rows"].append({"run": name, "tool": "mergekit 0.1.5", **row})
                print(json.dumps(results["rows"][-1]), flush=True)
    table = render(results)
    print(table)
    out = ROOT / "outputs" / f"bench_llm_{args.command}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    if args.write_doc and args.command in MARKERS:
        write_doc(ROOT / "docs" / "performance.md", table, *MARKERS[args.command])


if __name__ == "__main__":
    main()
