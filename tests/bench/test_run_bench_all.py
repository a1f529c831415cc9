"""`scripts/run_bench.py`: `make bench` runs the paper's nine variants on text and the ViT
set; `--all` (`make bench-all`) adds EfficientNet-Lite0's set, DARE, the ten 2024-2025
methods, model_stock and the data-dependent methods; `--data-free` all twenty-one data-free
rows; `--jobs` runs the sets side by side."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_run_bench():
    spec = importlib.util.spec_from_file_location("run_bench", ROOT / "scripts" / "run_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def planned(argv: list[str], monkeypatch, module=None) -> list[list[str]]:
    """The multirun override lists `main(argv)` would run (nothing is run)."""
    module = module or load_run_bench()
    calls: list[list[str]] = []
    monkeypatch.setattr(module, "multirun", calls.append)
    monkeypatch.setattr(module, "write_leaderboard", lambda db, out: [])
    assert module.main(argv) == 0
    return calls


def value(overrides: list[str], key: str) -> list[str]:
    (found,) = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")]
    return found.split(",")


def test_all_runs_the_new_methods_on_every_set(monkeypatch):
    module = load_run_bench()
    first, second = planned(["--all"], monkeypatch)
    for overrides in (first, second):
        assert value(overrides, "+experiment") == [
            "bench_text", "bench_vision_vit", "bench_vision"
        ]  # fmt: skip
    (chosen,) = planned(["--all", "--sets", "text"], monkeypatch)[:1]
    assert value(chosen, "+experiment") == ["bench_text"]  # --sets still chooses
    assert value(first, "+variant") == module.DATA_FREE_VARIANTS + module.MERGEKIT_VARIANTS
    assert module.DATA_FREE_VARIANTS == (
        module.PAPER_VARIANTS + module.DARE_VARIANTS + module.NEW_METHOD_VARIANTS
    )
    assert {"dare_task_arithmetic", "dare_ties"} <= set(module.DARE_VARIANTS)
    # The groups come from the variants' `board:` keys: a new variant joins without an edit here.
    ten = {"breadcrumbs", "della", "tall_masks", "consensus", "tsv", "iso_c", "iso_cts", "cart",
           "lines", "wudi"}  # fmt: skip
    assert ten <= set(module.NEW_METHOD_VARIANTS)
    assert "model_stock" in module.MERGEKIT_VARIANTS  # slerp merges two models: no board
    assert "slerp" not in module.ALL_DATA_FREE
    assert value(second, "+variant") == module.DATA_DEPENDENT_VARIANTS


def test_the_vit_board_runs_by_name_with_every_data_free_row(monkeypatch):
    """`--sets vision_vit --data-free`: the DINOv2 board with the twenty-one data-free rows
    (the paper's nine variants, DARE on both bases, the ten 2024-2025 methods), and no
    data-dependent multirun; the default sets are text and the ViT set."""
    module = load_run_bench()
    (only,) = planned(["--sets", "vision_vit", "--data-free"], monkeypatch)
    assert value(only, "+experiment") == ["bench_vision_vit"]
    rows = value(only, "+variant")
    assert rows == module.DATA_FREE_VARIANTS
    assert len(rows) == 21 and len(set(rows)) == 21 and "model_stock" not in rows
    (default,) = planned([], monkeypatch)
    assert value(default, "+experiment") == ["bench_text", "bench_vision_vit"]
    assert value(default, "+variant") == module.PAPER_VARIANTS


def test_jobs_run_each_set_in_its_own_process_with_cores_over_jobs_threads(monkeypatch):
    module = load_run_bench()
    launched: list[dict[str, list[str]]] = []
    monkeypatch.setattr(module.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(module, "run_in_parallel", lambda children: launched.append(children) or 0)
    argv = ["--jobs", "2", "--force", "--data-free", "--db", "r.sqlite", "zoo.dir=/z",
            "zoo.build_missing=false"]  # fmt: skip
    assert planned(argv, monkeypatch, module) == []  # nothing runs in this process
    (children,) = launched
    assert list(children) == ["text", "vision_vit"]
    for name, child in children.items():
        # Each child plans exactly one set, with the parent's overrides and options.
        (one,) = planned(child, monkeypatch)
        assert value(one, "+experiment") == [module.SETS[name]]
        assert value(one, "+variant") == module.DATA_FREE_VARIANTS
        assert {"zoo.dir=/z", "zoo.build_missing=false", "threads=4", "force=true"} <= set(one)
        assert "store.path=r.sqlite" in one
    launched.clear()
    planned(["--jobs", "2", "threads=1"], monkeypatch, module)  # the user's threads are kept
    assert all(c.count("threads=1") == 1 for c in launched[0].values())
    launched.clear()
    (one,) = planned(["--jobs", "2", "--sets", "text"], monkeypatch, module)  # one set
    assert launched == [] and value(one, "+experiment") == ["bench_text"]
    (both,) = planned([], monkeypatch, module)  # --jobs 1 (the default): one multirun
    assert value(both, "+experiment") == ["bench_text", "bench_vision_vit"]


def test_parallel_children_prefix_their_lines_and_report_failures(monkeypatch, capsys, tmp_path):
    """Each set runs this script again; its lines come back prefixed with the set; a failing
    set fails the run."""
    module = load_run_bench()
    fake = tmp_path / "fake_run_bench.py"
    fake.write_text(
        "import sys\n"
        "args = sys.argv[1:]\n"
        "print('args', ' '.join(args))\n"
        "sys.exit(3 if 'vision_vit' in args else 0)\n"
    )
    monkeypatch.setattr(module, "__file__", str(fake))
    code = module.run_in_parallel({"text": ["a", "text"], "vision_vit": ["b", "vision_vit"]})
    out, err = capsys.readouterr()
    assert code == 3
    assert "[text] args a text" in out and "[vision_vit] args b vision_vit" in out
    assert "the vision_vit set failed (exit code 3)" in err and "the text set failed" not in err


def test_make_bench_all_calls_run_bench_all():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nbench-all:", 1)[1].split("\n\n", 1)[0]
    assert "scripts/run_bench.py --all" in recipe


def test_variants_and_sets_narrow_the_run(monkeypatch):
    (only,) = planned(["--sets", "text", "--variants", "tsv", "wudi", "threads=1"], monkeypatch)
    assert value(only, "+experiment") == ["bench_text"]
    assert value(only, "+variant") == ["tsv", "wudi"]
    assert "threads=1" in only


def test_seeds_sweep_every_job_over_the_seeds(monkeypatch):
    (calls,) = planned(["--seeds", "0,1,2"], monkeypatch)
    assert value(calls, "seed") == ["0", "1", "2"]
    (default,) = planned([], monkeypatch)
    assert not [o for o in default if o.startswith("seed=")]  # one seed: the config's own


def test_bad_seeds_are_an_error(monkeypatch, capsys):
    import pytest

    for bad in ("a,b", "0,0", "1;2"):
        with pytest.raises(SystemExit) as exit_info:
            planned(["--seeds", bad], monkeypatch)
        assert exit_info.value.code == 2
        assert "--seeds" in capsys.readouterr().err


def test_make_bench_passes_the_seeds_to_the_zoo_and_the_runs():
    makefile = (ROOT / "Makefile").read_text()
    assert "SEEDS ?= 0" in makefile
    bench = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "run_bench.py --jobs $(BENCH_JOBS) --seeds $(SEEDS)" in bench
    assert "BENCH_JOBS ?= 1" in makefile
    zoo = makefile.split("\nzoo:", 1)[1].split("\n\n", 1)[0]
    assert "mergebench-zoo seed=$$seed" in zoo


def test_every_variant_names_its_board_group(tmp_path, monkeypatch):
    from mergebench.bench.variants import GROUPS, variant_groups, variants_in
    from mergebench.util.config import conf_dir, group_options
    from mergebench.util.errors import MergeBenchError

    groups = variant_groups()
    assert set(groups) == set(group_options("variant")) and set(groups.values()) <= set(GROUPS)
    assert variants_in("default")[:1] and "emr" in variants_in("default")
    assert "dare_ties" not in variants_in("default") and "dare_ties" in variants_in("dare")
    # A new variant file is picked up by its group, with no script edit.
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    (conf / "variant" / "my_ties.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /method: ties\nmethod:\n  k: 0.1\nboard: new\n"
    )
    (conf / "variant" / "broken.yaml").write_text("# @package _global_\nboard: nope\n")
    monkeypatch.setenv("MERGEBENCH_CONF", str(conf))

    with pytest.raises(MergeBenchError, match=r"broken.yaml: board: 'nope' is not one of"):
        variant_groups()
    (conf / "variant" / "broken.yaml").unlink()
    assert "my_ties" in variants_in("new")


def test_board_key_leaves_a_runs_hash_alone():
    from mergebench.bench.identity import VOLATILE_KEYS
    from mergebench.report.store import config_hash

    config = {"method": {"name": "ties", "k": 0.2}, "seed": 0}
    assert config_hash({**config, "board": "default"}, volatile=VOLATILE_KEYS) == config_hash(
        config, volatile=VOLATILE_KEYS
    )
