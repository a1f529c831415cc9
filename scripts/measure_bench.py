"""Measure the embedded benchmark's budget: building the default zoo (fresh cache) and one
`make bench` pass once the zoo exists (fresh results database), as a user would run them.

    python scripts/measure_bench.py                       # both, zoo in a fresh temp cache
    python scripts/measure_bench.py --skip-zoo --cache-dir ~/.cache/mergebench/zoo

Prints wall-clock seconds, CPU seconds and the load average (other processes on the machine
slow everything down: quote numbers from a quiet machine) and writes them to
`outputs/timings.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mergebench.cli.zoo import DEFAULT_SETS

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_avg_1m_at_start": load}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", help="zoo cache (default: a fresh temporary folder)")
    parser.add_argument("--skip-zoo", action="store_true", help="only time the bench pass")
    parser.add_argument(
        "--jobs", type=int, default=1, help="run_bench.py --jobs (make bench: BENCH_JOBS, 1)"
    )
    parser.add_argument("--out", default=str(ROOT / "outputs" / "timings.json"))
    args = parser.parse_args()

    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="mb-zoo-"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    report: dict[str, object] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cache_dir": str(cache),
    }
    if not args.skip_zoo:
        for name in DEFAULT_SETS:  # what `make zoo` builds
            report[f"zoo_{name}"] = timed(
                [
                    str(Path(PY).with_name("mergebench-zoo")),  # what `make zoo` runs
                    "--set",
                    name,
                    "--cache-dir",
                    str(cache),
                    "--no-progress",
                ],
                env,
            )
            print(name, report[f"zoo_{name}"], file=sys.stderr, flush=True)
    # --force: every run is timed even if the database already holds it; the results and
    # the leaderboard land in outputs/ as with `make bench`.
    out = ROOT / "outputs"
    report["bench"] = timed(
        [PY, "scripts/run_bench.py", "--jobs", str(args.jobs), "--force",
         "--db", str(out / "results.sqlite"), "--out", str(out), f"zoo.dir={cache}",
         "zoo.build_missing=false"],
        env,
    )  # fmt: skip
    report["leaderboard"] = json.loads((out / "leaderboard.json").read_text())
    print(json.dumps({k: v for k, v in report.items() if k != "leaderboard"}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
