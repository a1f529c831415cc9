"""Merge cost, measured: the streamed engine against a plain in-memory implementation.

Builds (once, cached) eight fine-tuned checkpoints with the shapes of CLIP ViT-B/32's vision
tower (87.8M parameters each; the pretrained model is open_clip's seeded random init, each
task adds seeded random deltas), then, for every data-free method, merges them from the
files to a saved artifact twice, each in a fresh process:
- `stream`: `mergebench.merge(..., output_dir=...)`, each tensor written into the artifact
  (safetensors shards, packed masks) as it is merged;
- `reference`: `mergebench.reference.merge_reference(...)` (everything flattened in RAM,
  bool masks, as the papers' code does) then `torch.save`.
Each process reports its wall time; its peak RSS comes from the kernel (`wait4`'s
`ru_maxrss`), so methods do not pollute each other. A third process checks that the two
artifacts hold the same numbers. The table goes to docs/performance.md (between markers),
all figures to outputs/bench_merge.json.

`--new` measures the ten 2024-2025 methods (breadcrumbs ... wudi) instead, beside task
arithmetic (both implementations, same run): `stream` only, since their in-memory
references (`mergebench.reference.breadcrumbs`, `.tsv`, ...) are per-tensor float64 /
Python-loop yardsticks, not meant for 87.8M x 8 entries. A spot check compares each
streamed artifact with that reference on a few keys (the other keys stand in as 1-entry
zeros, which keeps every key's position and block number). WUDI is measured with its
default settings on 2 of the 12 residual blocks and extrapolated (`--wudi-full`: all of
them, about half an hour on 2 cores). That table goes to its own block of
docs/performance.md (`bench_merge_methods`), the figures to outputs/bench_merge_methods.json.

    .venv/bin/python scripts/bench_merge.py                  # all methods (~15 min, 2 cores)
    .venv/bin/python scripts/bench_merge.py --methods emr    # one method
    .venv/bin/python scripts/bench_merge.py --new            # the ten (~15 min, 2 cores)
    .venv/bin/python scripts/bench_merge.py --methods tsv cart   # some of them
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergebench"
CACHE_VERSION = 1
# name -> parameters (defaults from conf/method/ otherwise); all data-free methods.
RUNS: dict[str, dict] = {
    "weight_averaging": {},
    "task_arithmetic": {},
    "ties": {},  # topk_scope=global: exact top-k over all 87.8M entries per task
    "dare": {},  # base task_arithmetic, p = 0.9
    "emr": {},
    "mask_rescale": {},  # base task_arithmetic
}
BEGIN, END = "<!-- bench_merge:begin -->", "<!-- bench_merge:end -->"
# The ten 2024-2025 methods (issue 11): streamed only, beside task arithmetic; defaults
# from conf/method/ except where the pool needs a setting.
NEW_RUNS: dict[str, dict] = {
    "breadcrumbs": {},
    "della": {},
    "tall_masks": {},  # threshold 0.6 for every task (the benchmark selects it per task)
    "consensus": {},
    "tsv": {},
    "iso_c": {},
    "iso_cts": {},
    "cart": {},
    "lines": {"layer_pattern": r"transformer\.resblocks\.(\d+)\."},  # no model family here
    "wudi": {},
}
NEW_BEGIN, NEW_END = "<!-- bench_merge_methods:begin -->", "<!-- bench_merge_methods:end -->"
BLOCKS = 12  # residual blocks of the ViT-B/32 vision tower
WUDI_BLOCKS = 2  # blocks WUDI fits unless --wudi-full (then all; its default `keys`)
NO_KEYS = r"(?!)"  # a regex that matches no key: WUDI reads, writes W_pre, fits nothing
# Keys the spot check compares with the in-memory reference (the rest stand in as zeros):
# 1-D, a small 2-D table, both matrix shapes of block 0, a block-9 tensor (LiNeS' lambda).
SPOT_KEYS = [
    "class_embedding",
    "ln_pre.weight",
    "positional_embedding",
    "transformer.resblocks.0.attn.out_proj.weight",
    "transformer.resblocks.0.mlp.c_proj.weight",
    "transformer.resblocks.9.ln_1.weight",
    "transformer.resblocks.9.attn.out_proj.bias",
]
# Where the reference is slow (Python loops, float64 autograd): the small keys only.
SPOT_SMALL = {"della", "wudi"}


# --- checkpoints --------------------------------------------------------------------------
def build_checkpoints(folder: Path, num_tasks: int) -> tuple[Path, dict[str, Path]]:
    """The cached pool: `pretrained.safetensors` and `task_<i>.safetensors`."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    pretrained = folder / "pretrained.safetensors"
    finetuned = {f"task_{i}": folder / f"task_{i}.safetensors" for i in range(num_tasks)}
    expected = {"version": CACHE_VERSION, "tasks": num_tasks}
    files = [pretrained, *finetuned.values()]
    built = manifest.exists() and json.loads(manifest.read_text()).get("build") == expected
    if built and all(p.exists() for p in files):
        return pretrained, finetuned

    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)  # random init, no download
    pre = {k: v.detach().clone().contiguous() for k, v in model.visual.state_dict().items()}
    del model
    _save_atomic(save_file, pre, pretrained)
    for index, path in enumerate(tqdm(finetuned.values(), desc="fine-tuned checkpoints")):
        g = torch.Generator().manual_seed(1000 + index)
        # Per-tensor delta scale varies by task, like real fine-tuning runs of different length.
        scale = 1e-3 * (1.0 + 0.5 * index / max(1, num_tasks - 1))
        ft = {k: v + torch.randn(v.shape, generator=g) * scale for k, v in pre.items()}
        _save_atomic(save_file, ft, path)
        del ft
    params = sum(v.numel() for v in pre.values())
    manifest.write_text(
        json.dumps(
            {
                "build": expected,
                "shapes": "open_clip ViT-B-32 .visual (random init, torch.manual_seed(0))",
                "parameters": params,
                "tensors": len(pre),
                "deltas": "randn * 1e-3 * (1 + 0.5 i/(N-1)), generator seed 1000 + i",
            },
            indent=2,
        )
    )
    return pretrained, finetuned


def _save_atomic(save_file, tensors, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


# --- one measured run (child process) -----------------------------------------------------
def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import mergebench
    from mergebench.reference import merge_reference, save_reference
    from mergebench.results import artifact_bytes

    pretrained, finetuned = _pool_paths(Path(args.pool))
    params = json.loads(args.params)
    out = Path(args.out)
    # Once per process, like torch's import above, and reported on their own: the modules a
    # streamed merge imports on its first call, numba's with its compiler state.
    began = time.perf_counter()
    if args.impl == "stream":
        import mergebench.api  # noqa: F401
        from mergebench.engine import kernels
        from mergebench.methods.registry import method_class

        method_class(args.method)
        kernels.warm_up()
    imported = time.perf_counter()
    start = time.perf_counter()
    if args.impl == "stream":
        # Streamed: each tensor is written into the artifact as it is merged (issue 13).
        mergebench.merge(args.method, pretrained, finetuned, progress=False, output_dir=out,
                         **params)  # fmt: skip
        merged = time.perf_counter()
        size = artifact_bytes(out)
    else:
        result = merge_reference(args.method, pretrained, finetuned, **params)
        merged = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        size = save_reference(result, out / "reference.pt").stat().st_size
    done = time.perf_counter()
    report = {"merge_s": merged - start, "total_s": done - start, "bytes": size,
              "imports_s": imported - began}  # fmt: skip
    print(json.dumps({**report, "vm_hwm_bytes": _vm_hwm()}))


def _vm_hwm() -> int:
    """This process's peak resident set since it started (Linux `VmHWM`), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _pool_paths(folder: Path) -> tuple[Path, dict[str, Path]]:
    finetuned = {p.stem: p for p in sorted(folder.glob("task_*.safetensors"))}
    return folder / "pretrained.safetensors", finetuned


def measure(pool: Path, impl: str, method: str, params: dict, out: Path, threads: int) -> dict:
    """Run one merge in a fresh process; wall time from inside, peak RSS from the kernel."""
    command = [
        sys.executable, __file__, "_worker", "--impl", impl, "--method", method,
        "--params", json.dumps(params), "--pool", str(pool), "--out", str(out),
        "--threads", str(threads),
    ]  # fmt: skip
    report = measure_child(command, f"{impl} {method}")
    # The child's own high-water mark. (`ru_maxrss` from wait4 also counts the pages it
    # shared with this parent before exec, which is why the parent imports no torch.)
    report["peak_rss_bytes"] = report.pop("vm_hwm_bytes")
    return report


def measure_child(command: list[str], what: str) -> dict:
    """Run `command` in a fresh process: the last JSON line it prints, with its wall time
    (`process_s`), CPU seconds (`cpu_s` = `user_s` + `system_s`) and `ru_maxrss_bytes` from
    the kernel (`wait4`: this child's own rusage) and the load average before it started."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{what} failed ({code}):\n{errors[-3000:]}")
    lines = [line for line in output.strip().splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    report.update(
        process_s=time.perf_counter() - started,
        cpu_s=usage.ru_utime + usage.ru_stime,
        user_s=usage.ru_utime,
        system_s=usage.ru_stime,
        ru_maxrss_bytes=usage.ru_maxrss * 1024,  # Linux reports KiB
        load_before=load_before,
    )
    return report


def warm_page_cache(pool: Path) -> None:
    """Read every checkpoint once, so that the next run starts from the page cache."""
    for path in sorted(pool.glob("*.safetensors")):
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def read_once_s(pool: Path, tries: int = 3, pattern: str = "*.safetensors") -> float:
    """Seconds to read every checkpoint of the pool once from the page cache into one reused
    16 MiB buffer (unbuffered `readinto`, so one read(2) per 16 MiB), best of `tries`: the
    floor a merge that reads the pool once could reach on this machine at this moment. The
    buffer is in huge pages, as the merge's are: into 4 KiB pages the same reads cost up to
    4x more system time on our VM, by which physical pages the buffer happens to get."""
    from mergebench.util.buffers import huge_page_array

    buffer = memoryview(huge_page_array(1 << 24, "uint8"))
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        for path in sorted(pool.glob(pattern)):
            with open(path, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass
        best = min(best, time.perf_counter() - started)
    return best


def baseline_rss(threads: int) -> int:
    """Peak RSS of a process that only imports torch and mergebench (counted in every row)."""
    code = (
        f"import torch; torch.set_num_threads({threads}); import mergebench.reference; "
        "from pathlib import Path; "
        "print([l for l in Path('/proc/self/status').read_text().splitlines() "
        "if l.startswith('VmHWM:')][0].split()[1])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) * 1024


# --- checking the two artifacts (child process) -------------------------------------------
def run_verify(args: argparse.Namespace) -> None:
    import torch

    from mergebench.engine.checkpoints import open_checkpoint
    from mergebench.results import load_result

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))

    pretrained, _ = _pool_paths(Path(args.pool))
    streamed = load_result(args.stream)
    reference = torch.load(Path(args.reference), weights_only=True, mmap=True)
    report: dict = {"compared_tensors": 0, "differing_tensors": 0}
    if "unified" not in reference:
        state = streamed.state_dict()
        for key, expected in reference.items():
            report["compared_tensors"] += 1
            report["differing_tensors"] += not same(state[key], expected)
    else:
        pre = open_checkpoint(pretrained)
        tasks = reference["tasks"]
        for key, expected in reference["unified"].items():
            report["compared_tensors"] += 1 + len(tasks)
            report["differing_tensors"] += not same(streamed.unified[key], expected)
            for index, task in enumerate(tasks):
                mask = streamed.mask(task, key)
                report["differing_tensors"] += not torch.equal(mask, reference["masks"][key][index])
        diffs = [
            abs(streamed.rescalers[t] - reference["rescalers"][t]) / abs(reference["rescalers"][t])
            for t in tasks
        ]
        report["rescaler_max_rel_diff"] = max(diffs)
        # Every task's weights as the evaluator gets them, against the reference's formula.
        report["task_weights_differing"] = 0
        for index, task in enumerate(tasks):
            weights = streamed.state_dict(task)
            lam = float(reference["rescalers"][task])
            for key, uni in reference["unified"].items():
                expected = pre.get(key) + uni * reference["masks"][key][index] * lam
                report["task_weights_differing"] += not same(weights[key], expected)
            del weights
    print(json.dumps(report))


def run_spot(args: argparse.Namespace) -> None:
    """The streamed artifact of a 2024-2025 method against its in-memory reference on
    `--keys`; every other key of the pool stands in as a 1-entry zero in every model, so
    key positions (DELLA's draws), block numbers (LiNeS) and the task count stay."""
    import inspect

    import torch
    from safetensors import safe_open

    from mergebench.methods.registry import method_defaults
    from mergebench.reference import breadcrumbs, cart, della, iso, lines, tall_masks, tsv, wudi
    from mergebench.results import load_result

    functions = {
        "breadcrumbs": breadcrumbs.breadcrumbs_reference,
        "della": della.della_reference,
        "tall_masks": tall_masks.tall_masks_reference,
        "consensus": tall_masks.consensus_reference,
        "tsv": tsv.merge_tsv,
        "iso_c": iso.merge_iso_c,
        "iso_cts": iso.merge_iso_cts,
        "cart": cart.merge_cart,
        "lines": lines.lines_reference,
        "wudi": wudi.merge_wudi,
    }
    keys = json.loads(args.keys)
    params = {**method_defaults(args.method), **json.loads(args.params)}
    function = functions[args.method]
    accepted = inspect.signature(function).parameters
    params = {k: v for k, v in params.items() if k in accepted}

    def load(path: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(path), "pt") as handle:
            return {k: handle.get_tensor(k) if k in keys else torch.zeros(1) for k in handle.keys()}

    pretrained, finetuned = _pool_paths(Path(args.pool))
    pre = load(pretrained)
    fts = {task: load(path) for task, path in finetuned.items()}
    expected = function(pre, fts, **params)
    streamed = load_result(args.stream)
    pairs = []  # (what, streamed, expected)
    if args.method == "tall_masks":
        for key in keys:
            pairs.append((f"unified {key}", streamed.unified[key], expected.unified[key]))
            for task in fts:
                mask = streamed.mask(task, key)
                pairs.append((f"mask {task} {key}", mask, expected.masks[task][key]))
        for task in fts:
            state = streamed.state_dict(task)
            pairs += [(f"{task} {k}", state[k], expected.weights[task][k]) for k in keys]
            del state
    else:
        if args.method == "lines":
            expected = expected[0]  # (weights, alpha)
        state = streamed.state_dict()
        pairs = [(key, state[key], expected[key]) for key in keys]
    report = {"keys": len(keys), "compared": len(pairs), "identical": 0, "max_abs_diff": 0.0}
    report["close"] = True
    for _, got, want in pairs:
        got, want = got.to(torch.float64), want.to(torch.float64)
        report["identical"] += bool(torch.equal(got, want))
        report["max_abs_diff"] = max(report["max_abs_diff"], (got - want).abs().max().item())
        # The tests' tolerance for the float64 references (test_method_tsv.py and others).
        report["close"] &= bool(torch.allclose(got, want, rtol=1e-5, atol=2e-5))
    print(json.dumps(report))


def spot_check(pool: Path, method: str, params: dict, stream_dir: Path) -> dict:
    keys = [k for k in SPOT_KEYS if method not in SPOT_SMALL or "c_proj" not in k]
    command = [
        sys.executable, __file__, "_spot", "--method", method, "--params", json.dumps(params),
        "--pool", str(pool), "--stream", str(stream_dir), "--keys", json.dumps(keys),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"spot check of {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def switching(artifact: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "_switch", "--artifact", str(artifact)]
    command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"switching benchmark failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def verify(pool: Path, stream_dir: Path, reference_file: Path) -> dict:
    command = [
        sys.executable, __file__, "_verify", "--pool", str(pool), "--stream", str(stream_dir),
        "--reference", str(reference_file),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"verification failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- task switching (child process) -------------------------------------------------------
def run_switch(args: argparse.Namespace) -> None:
    """Seconds per task change of an EMR result on a live ViT-B/32 vision tower: rebuilding
    the weights (`load_state_dict(result.state_dict(task))`) against `TaskSwitcher`."""
    import open_clip
    import torch

    torch.set_num_threads(args.threads)
    from mergebench.results import load_result
    from mergebench.results.switching import TaskSwitcher

    result = load_result(args.artifact)
    model = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    timings: dict[str, list[float]] = {"materialize": [], "load_state_dict": [], "switch": []}
    for task in result.tasks:
        start = time.perf_counter()
        state = result.state_dict(task)
        built = time.perf_counter()
        model.load_state_dict(state)
        timings["materialize"].append(built - start)
        timings["load_state_dict"].append(time.perf_counter() - start)
        del state
    expected = {k: v.clone() for k, v in model.state_dict().items()}  # the last task's weights
    start = time.perf_counter()
    switcher = TaskSwitcher(result, model)
    setup = time.perf_counter() - start
    for task in result.tasks:
        start = time.perf_counter()
        switcher.switch(task)
        timings["switch"].append(time.perf_counter() - start)
    identical = all(
        torch.equal(v.view(torch.int32), expected[k].view(torch.int32))
        if v.dtype == torch.float32
        else torch.equal(v, expected[k])
        for k, v in model.state_dict().items()
    )
    means = {k: sum(v) / len(v) for k, v in timings.items()}
    print(json.dumps({**means, "switcher_setup": setup, "identical": identical}))


# --- the report ---------------------------------------------------------------------------
def source_commit() -> str:
    """The checkout's commit, `+changes` when `src/` or `scripts/` differ from it: what a
    table's figures were measured on."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--", "src", "scripts") else "")


def machine_facts(threads: int) -> dict:
    torch_version = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(
            int(line.split()[1]) * 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        mem = 0
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": source_commit(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "memory_bytes": mem,
        "python": platform.python_version(),
        "torch": torch_version,
        "platform": platform.platform(),
    }


def render(results: dict) -> str:
    gib, mib = 1024**3, 1024**2
    facts = results["machine"]
    lines = [
        f"Measured {facts['date']} at commit {facts.get('commit', 'unknown')} on {facts['cpu']}, {facts['cores']} cores "
        f"({facts['threads']} torch threads), {facts['memory_bytes'] / gib:.0f} GiB RAM; "
        f"Python {facts['python']}, torch {facts['torch']}. Pool: "
        f"{results['pool']['parameters'] / 1e6:.1f}M parameters x {results['pool']['tasks']} "
        "fine-tuned + 1 pretrained (float32 safetensors, in the page cache). Each cell: one "
        "fresh process, files to saved artifact (`wall s`; the modules a streamed merge "
        "imports on its first call, numba's compiler state among them, are loaded before "
        "the clock starts, as torch is, and timed on their own: `imports s`). Peak RSS includes "
        f"{results['baseline_rss_bytes'] / mib:.0f} MiB that importing torch alone costs.",
        "",
        "| method | impl | wall s | imports s | read once s | limit (x read) | peak RSS MiB "
        "| artifact MiB | CPU s | load | identical |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for method, row in results["methods"].items():
        check = row["check"]
        ok = check["differing_tensors"] == 0 and check.get("task_weights_differing", 0) == 0
        same = "yes" if ok else f"NO ({check['differing_tensors']} tensors)"
        if "rescaler_max_rel_diff" in check:
            same += f"; rescalers within {check['rescaler_max_rel_diff']:.0e}"
        for impl in ("reference", "stream"):
            r = row[impl]
            imports = f"{r['imports_s']:.2f}" if impl == "stream" and "imports_s" in r else ""
            lines.append(
                f"| {method} | {impl} | {r['total_s']:.2f} | {imports} | {_limit(row, r)} | "
                f"{r['peak_rss_bytes'] / mib:.0f} | {r['bytes'] / mib:.0f} | {r['cpu_s']:.1f} | "
                f"{r['load_before']:.1f} | {same if impl == 'stream' else ''} |"
            )
        cpu = row["reference"]["cpu_s"] / row["stream"]["cpu_s"]
        lines.append(
            f"| {method} | **ratio** | **{row['ratio']['time']:.1f}x faster** | | "
            f"| | **{row['ratio']['rss']:.2f}** | **{row['ratio']['bytes']:.2f}** | "
            f"**{cpu:.1f}x less** | | |"
        )
    lines += [
        "",
        "Ratios: wall time and CPU time reference / stream; peak RSS and artifact bytes "
        "stream / reference. `read once s`: reading every checkpoint of the pool once from "
        "the page cache into one reused buffer in huge pages (best of 3, measured just before "
        "the method's runs); `limit`: the row's wall time as a multiple of it. "
        "`load`: the machine's 1-minute load average as the run started "
        "(it is shared; a busy machine stretches the reference's wall time more than its CPU "
        "time, so read both ratios).",
    ]
    lines += _targets(results)
    if "switching" in results:
        sw = results["switching"]
        lines += [
            "",
            "Task switching, EMR result on a live ViT-B/32 vision tower (seconds per task, "
            "mean over the 8 tasks):",
            "",
            "| way | s per task |",
            "| --- | ---: |",
            f"| `result.state_dict(task)` (materialize) | {sw['materialize']:.3f} |",
            f"| `model.load_state_dict(result.state_dict(task))` | {sw['load_state_dict']:.3f} |",
            f"| `TaskSwitcher(result, model).switch(task)` (in place) | {sw['switch']:.3f} |",
            "",
            f"Switcher set-up (once per result and model): {sw['switcher_setup']:.2f} s; "
            f"switched weights bit-identical to loaded ones: {'yes' if sw['identical'] else 'NO'}.",
        ]
    return "\n".join(lines)


def _targets(results: dict) -> list[str]:
    """Issues 6 and 13's targets against this run."""
    rows = results["methods"]
    out = ["", "| target | this run | met |", "| --- | --- | --- |"]

    def add(name: str, value: str, ok: bool) -> None:
        out.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")

    if "emr" in rows:
        emr = rows["emr"]
        check = emr["check"]
        cpu = emr["reference"]["cpu_s"] / emr["stream"]["cpu_s"]
        add(
            "EMR files to artifact: >= 4x less wall time",
            f"{emr['ratio']['time']:.1f}x (CPU time {cpu:.1f}x)",
            emr["ratio"]["time"] >= 4,
        )
        add(
            "EMR peak RSS <= 1/4 of in-memory",
            f"{emr['ratio']['rss']:.2f}",
            emr["ratio"]["rss"] <= 0.25,
        )
        identical = check["differing_tensors"] == 0 and check["task_weights_differing"] == 0
        add(
            "EMR identical outputs",
            f"{check['compared_tensors']} tensors + every task's weights bit-identical; "
            f"rescalers within {check['rescaler_max_rel_diff']:.0e}",
            identical,
        )
        add(
            "EMR artifact <= 0.45 of bool masks",
            f"{emr['ratio']['bytes']:.3f}",
            emr["ratio"]["bytes"] <= 0.45,
        )
        add(
            "EMR files to artifact (issue 13): >= 10x less wall time",
            f"{emr['ratio']['time']:.1f}x (CPU time {cpu:.1f}x)",
            emr["ratio"]["time"] >= 10,
        )
        add(
            "EMR peak RSS (issue 13) <= 0.15 of in-memory",
            f"{emr['ratio']['rss']:.2f}",
            emr["ratio"]["rss"] <= 0.15,
        )
    if "ties" in rows:
        check = rows["ties"]["check"]
        add(
            "TIES global top-k streamed = in-memory",
            f"{check['compared_tensors'] - check['differing_tensors']}/{check['compared_tensors']} "
            "tensors bit-identical",
            check["differing_tensors"] == 0,
        )
    return out


def write_doc(path: Path, table: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block between `begin` and `end` (appended if the file has none)."""
    text = path.read_text() if path.exists() else f"# Performance\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1] if end in rest else ""
    path.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


# --- the ten 2024-2025 methods ------------------------------------------------------------
def wudi_keys(blocks: int) -> str:
    """WUDI's default `keys` (`.*\\.weight`) restricted to the first `blocks` blocks."""
    if blocks >= BLOCKS:
        return r".*\.weight"
    numbers = "|".join(str(b) for b in range(blocks))
    return rf"transformer\.resblocks\.({numbers})\..*\.weight"


def measure_new(pool: Path, work: Path, args: argparse.Namespace, methods: list[str]) -> dict:
    """Task arithmetic (reference and stream, checked) then each method streamed, spot-checked
    against its in-memory reference; WUDI on a subset of blocks plus a no-fit run to
    extrapolate from, unless `--wudi-full`."""
    rows: dict = {}

    def run(name: str, impl: str, method: str, params: dict) -> dict:
        out = work / f"{name}_{impl}"
        warm_page_cache(pool)  # whatever the run before pushed out of the page cache
        r = measure(pool, impl, method, params, out, args.threads)
        print(
            f"{name:17s} {impl:9s} {r['total_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
            f"{r['peak_rss_bytes'] / 2**20:7.0f} MiB  {r['bytes'] / 2**20:6.0f} MiB out  "
            f"(load {r['load_before']:.1f})",
            flush=True,
        )
        return r

    ta: dict = {"read_once_s": read_once_s(pool)}
    ta.update(
        (impl, run("task_arithmetic", impl, "task_arithmetic", {}))
        for impl in ("reference", "stream")
    )
    ta["check"] = verify(
        pool, work / "task_arithmetic_stream", work / "task_arithmetic_reference" / "reference.pt"
    )
    rows["task_arithmetic"] = ta
    shutil.rmtree(work / "task_arithmetic_reference", ignore_errors=True)
    shutil.rmtree(work / "task_arithmetic_stream", ignore_errors=True)
    for method in methods:
        params = dict(NEW_RUNS[method])
        variants = [(method, params, None)]
        if method == "wudi" and not args.wudi_full:
            fitted = {**params, "keys": wudi_keys(WUDI_BLOCKS)}
            # `keys` matching nothing: no matrix fitted (steps=0 would still evaluate the loss
            # of every matrix once, which the 2-block run does for its matrices only).
            nofit = {**params, "keys": NO_KEYS}
            variants = [("wudi", fitted, WUDI_BLOCKS), ("wudi_nofit", nofit, 0)]
        for name, run_params, blocks in variants:
            row = {"read_once_s": read_once_s(pool)}
            row.update(stream=run(name, "stream", method, run_params), params=run_params)
            if blocks is not None:
                row["blocks_fitted"] = blocks
            if name != "wudi_nofit":
                row["check"] = spot_check(pool, method, run_params, work / f"{name}_stream")
                print(f"{name:17s} check     {row['check']}", flush=True)
            rows[name] = row
            shutil.rmtree(work / f"{name}_stream", ignore_errors=True)
    if "wudi_nofit" in rows:
        rows["wudi_extrapolated"] = extrapolate_wudi(rows["wudi"], rows["wudi_nofit"])
    return rows


def extrapolate_wudi(fitted: dict, nofit: dict) -> dict:
    """All 12 blocks from `WUDI_BLOCKS` of them: the no-fit run (read, write) plus the
    fitting time scaled by the number of blocks (every block has the same matrix shapes).
    Peak RSS and artifact size are those measured (keys are streamed one at a time, and
    unfitted keys are written anyway)."""
    scale = BLOCKS / fitted["blocks_fitted"]
    stream = {}
    for field in ("total_s", "cpu_s"):
        fit = max(0.0, fitted["stream"][field] - nofit["stream"][field])
        stream[field] = nofit["stream"][field] + scale * fit
    stream["peak_rss_bytes"] = fitted["stream"]["peak_rss_bytes"]
    stream["bytes"] = fitted["stream"]["bytes"]
    stream["load_before"] = None
    return {"stream": stream, "extrapolated": True, "scale": scale}


def render_methods(results: dict) -> str:
    gib, mib = 1024**3, 1024**2
    facts = results["machine"]
    rows = results["methods"]
    ta = rows["task_arithmetic"]
    base_wall, base_cpu = ta["stream"]["total_s"], ta["stream"]["cpu_s"]
    lines = [
        f"Measured {facts['date']} at commit {facts.get('commit', 'unknown')} on {facts['cpu']}, {facts['cores']} cores "
        f"({facts['threads']} torch threads), {facts['memory_bytes'] / gib:.0f} GiB RAM; "
        f"Python {facts['python']}, torch {facts['torch']}. Same pool as above: "
        f"{results['pool']['parameters'] / 1e6:.1f}M parameters x {results['pool']['tasks']} "
        "fine-tuned + 1 pretrained. Each row: one fresh process, files to saved artifact "
        "(`mergebench.merge` then `result.save`), default settings. Peak RSS includes "
        f"{results['baseline_rss_bytes'] / mib:.0f} MiB that importing torch alone costs.",
        "",
        "| method | impl | wall s | CPU s | x TA wall | x TA CPU | read once s | limit (x read) "
        "| peak RSS MiB | artifact MiB | load | check |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def line(label: str, impl: str, r: dict, check: str, row: dict) -> None:
        load = "" if r.get("load_before") is None else f"{r['load_before']:.1f}"
        lines.append(
            f"| {label} | {impl} | {r['total_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['total_s'] / base_wall:.1f} | {r['cpu_s'] / base_cpu:.1f} | {_limit(row, r)} | "
            f"{r['peak_rss_bytes'] / mib:.0f} | {r['bytes'] / mib:.0f} | {load} | {check} |"
        )

    check = ta["check"]
    same = "= stream, bit for bit" if check["differing_tensors"] == 0 else "**differs**"
    line("task_arithmetic", "reference", ta["reference"], "", ta)
    line("task_arithmetic", "stream", ta["stream"], f"reference {same}", ta)
    for name, row in rows.items():
        if name == "task_arithmetic":
            continue
        if name == "wudi_extrapolated":
            line(
                f"wudi (all {BLOCKS} blocks) **extrapolated**", "stream", row["stream"],
                f"**estimate**: no-fit run + {row['scale']:.0f} x the fitting time measured "
                "above; RSS and artifact as measured", rows["wudi"],
            )  # fmt: skip
            continue
        label = name
        if name == "wudi" and row.get("blocks_fitted", BLOCKS) < BLOCKS:
            label = f"wudi ({row['blocks_fitted']} of {BLOCKS} blocks fitted, measured)"
        if name == "wudi_nofit":
            label = "wudi (no matrix fitted: read, write)"
        line(label, "stream", row["stream"], _spot_text(row.get("check")), row)
    lines += [
        "",
        "`x TA`: the row's wall / CPU time over task arithmetic's streamed one in this run. "
        "`read once s`: reading the pool once from the page cache (best of 3, just before the "
        "method's runs); `limit`: the row's wall time as a multiple of it. "
        "`check`: the streamed artifact against the method's in-memory reference "
        "(`mergebench.reference.*`: per-tensor, float64 for the SVD methods and WUDI) on "
        f"{len(SPOT_KEYS)} keys (DELLA and WUDI: the small ones; for TALL masks every task's "
        "mask and weights too), the other keys standing in as zeros: bit-identical, or the "
        "largest absolute difference within the tests' tolerance (1e-5 relative + 2e-5). "
        "There is no whole-model in-memory implementation of these methods to race at this "
        "scale (the references are yardsticks: DELLA's ranks a Python loop, WUDI autograd in "
        "float64). `load`: the 1-minute load average as the run started.",
    ]
    return "\n".join(lines)


def _limit(row: dict, r: dict) -> str:
    """`read once s | limit` cells: the pool's read-once time and the wall time over it."""
    read = row.get("read_once_s")
    if read is None:
        return " | "
    return f"{read:.2f} | {r['total_s'] / read:.1f}x"


def _spot_text(check: dict | None) -> str:
    if not check:
        return ""
    if check["identical"] == check["compared"]:
        return f"bit-identical ({check['compared']} tensors)"
    verdict = "close" if check["close"] else "**NOT close**"
    return (
        f"{verdict}: max abs diff {check['max_abs_diff']:.1e} "
        f"({check['identical']}/{check['compared']} tensors bit-identical)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("_worker")
    for name in ("impl", "method", "params", "pool", "out"):
        worker.add_argument(f"--{name}", required=True)
    worker.add_argument("--threads", type=int, default=2)
    switch = sub.add_parser("_switch")
    switch.add_argument("--artifact", required=True)
    switch.add_argument("--threads", type=int, default=2)
    build = sub.add_parser("_build")
    build.add_argument("--pool", type=Path, required=True)
    build.add_argument("--tasks", type=int, required=True)
    spot = sub.add_parser("_spot")
    for name in ("method", "params", "pool", "stream", "keys"):
        spot.add_argument(f"--{name}", required=True)
    check = sub.add_parser("_verify")
    for name in ("pool", "stream", "reference"):
        check.add_argument(f"--{name}", required=True)
    parser.add_argument(
        "--methods", nargs="+", choices=[*RUNS, *NEW_RUNS], default=None,
        help="default: every method of the first table (or, with --new, none of it)",
    )  # fmt: skip
    parser.add_argument(
        "--new", action="store_true",
        help="the ten 2024-2025 methods beside task arithmetic (second table)",
    )  # fmt: skip
    parser.add_argument("--wudi-full", action="store_true", help="fit all of WUDI's blocks")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "bench_merge")
    parser.add_argument("--work", type=Path, default=None, help="artifact scratch folder")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench_merge.json")
    parser.add_argument(
        "--json-methods", type=Path, default=ROOT / "outputs" / "bench_merge_methods.json"
    )
    args = parser.parse_args(argv)
    if args.command == "_worker":
        return run_worker(args)
    if args.command == "_verify":
        return run_verify(args)
    if args.command == "_switch":
        return run_switch(args)
    if args.command == "_spot":
        return run_spot(args)
    if args.command == "_build":
        build_checkpoints(args.pool, args.tasks)
        return None

    chosen = args.methods or ([] if args.new else list(RUNS))
    paper = [m for m in chosen if m in RUNS]
    new = [m for m in chosen if m in NEW_RUNS] or (list(NEW_RUNS) if args.new else [])
    pool = args.cache / f"vit_b32_{args.tasks}tasks"
    print(f"checkpoints: {pool}", flush=True)
    # In a child: this process stays small (see `measure`) and imports no torch.
    subprocess.run(
        [sys.executable, __file__, "_build", "--pool", str(pool), "--tasks", str(args.tasks)],
        check=True,
    )
    manifest = json.loads((pool / "manifest.json").read_text())
    warm_page_cache(pool)
    work = Path(tempfile.mkdtemp(prefix="bench_merge_", dir=args.work))
    results: dict = {
        "machine": machine_facts(args.threads),
        "pool": {"parameters": manifest["parameters"], "tasks": args.tasks, "folder": str(pool)},
        "baseline_rss_bytes": baseline_rss(args.threads),
        "methods": {},
    }
    try:
        if new:
            fresh = {**results, "methods": measure_new(pool, work, args, new)}
            args.json_methods.parent.mkdir(parents=True, exist_ok=True)
            args.json_methods.write_text(json.dumps(fresh, indent=2) + "\n")
            table = render_methods(fresh)
            write_doc(args.doc, table, NEW_BEGIN, NEW_END)
            print(table)
        for method in paper:
            params = RUNS[method]
            row = {"read_once_s": read_once_s(pool)}
            print(f"{method:17s} read once {row['read_once_s']:7.2f} s", flush=True)
            for impl in ("reference", "stream"):
                out = work / f"{method}_{impl}"
                # The in-memory TIES holds 14.5 GB: what it pushed out of the page cache
                # would stretch the streamed cell after it.
                warm_page_cache(pool)
                row[impl] = measure(pool, impl, method, params, out, args.threads)
                r = row[impl]
                print(
                    f"{method:17s} {impl:9s} {r['total_s']:7.1f} s  "
                    f"{r['peak_rss_bytes'] / 2**20:7.0f} MiB  {r['bytes'] / 2**20:6.0f} MiB out  "
                    f"(load {r['load_before']:.1f})",
                    flush=True,
                )
            row["check"] = verify(
                pool, work / f"{method}_stream", work / f"{method}_reference" / "reference.pt"
            )
            if method == "emr":
                results["switching"] = switching(work / "emr_stream", args.threads)
                print(f"{'switching':17s} {results['switching']}", flush=True)
            print(f"{method:17s} check     {row['check']}", flush=True)
            row["ratio"] = {
                "time": row["reference"]["total_s"] / row["stream"]["total_s"],
                "rss": row["stream"]["peak_rss_bytes"] / row["reference"]["peak_rss_bytes"],
                "bytes": row["stream"]["bytes"] / row["reference"]["bytes"],
            }
            results["methods"][method] = row
            for impl in ("reference", "stream"):
                shutil.rmtree(work / f"{method}_{impl}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not paper:
        return None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    table = render(results)
    write_doc(args.doc, table)
    print(table)


if __name__ == "__main__":
    main()
