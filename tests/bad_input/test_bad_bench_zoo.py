"""The `mergebench` app and `mergebench-zoo` given bad input, failing before any training
(the cache points into a temporary folder, and nothing is built)."""

from __future__ import annotations

import sys

import pytest

from bad_input.conftest import Outcome, assert_one_line_error, tree_hash
from mergebench.cli.common import check_top_level_keys
from mergebench.util.config import compose_config
from mergebench.util.errors import MergeBenchError

# Guards: if a case ever got past the config, it would still not train or store anything.
SAFE = ("zoo.build_missing=false", "store.path=null", "references=false", "progress=false")


@pytest.fixture
def bench_cli(work, capsys, monkeypatch):
    from mergebench.cli.bench import main

    def run(*args: str) -> Outcome:
        monkeypatch.chdir(work)
        monkeypatch.setattr(sys, "argv", ["mergebench", *SAFE, *args])
        before = tree_hash(work)
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        outcome = Outcome(code, capsys.readouterr().err)
        assert tree_hash(work) == before
        assert not (work / "cache").exists()
        return outcome

    return run


def test_bench_unknown_method(bench_cli):
    assert_one_line_error(bench_cli("method=emr_merging"), "method/emr_merging", "ties")


def test_bench_unknown_model(bench_cli):
    assert_one_line_error(bench_cli("model=resnet9000"), "model/resnet9000")


def test_bench_unknown_method_option(bench_cli):
    assert_one_line_error(bench_cli("method=ties", "method.kk=0.1"), "method.kk: no such setting")


def test_bench_method_option_without_plus(bench_cli):
    assert_one_line_error(bench_cli("method=ties", "k=0.1"), "k: no such setting", "method.k=")


def test_bench_bad_override_syntax(bench_cli):
    assert_one_line_error(bench_cli("method=ties", "method.k=[0.1"), "method.k")


def test_bench_method_option_added_at_top_level():
    """`mergebench method=ties +k=0.1`: the check `cli/bench.py` runs before the job."""
    overrides = ["method=ties", "+k=0.1"]
    cfg = compose_config(overrides)
    with pytest.raises(MergeBenchError, match=r"k: is an option of method ties.*method\.k=0\.1"):
        check_top_level_keys(cfg, overrides=overrides)
    check_top_level_keys(
        compose_config(["method=ties", "method.k=0.1"]), overrides=["method.k=0.1"]
    )
    check_top_level_keys(cfg, overrides=["+variant=emr"])  # groups added with + are fine


def test_zoo_unknown_set(work, capsys, monkeypatch):
    from mergebench.cli.zoo import main

    monkeypatch.chdir(work)
    before = tree_hash(work)
    code = main(["--set", "textt", "--cache-dir", str(work / "cache")])
    outcome = Outcome(code, capsys.readouterr().err)
    assert_one_line_error(outcome, "taskset: unknown taskset 'textt'")
    assert tree_hash(work) == before
    assert not (work / "cache").exists()


def test_zoo_unknown_override_fails_before_any_training(work, capsys, monkeypatch):
    """`--set text nosuch=1` once started fine-tuning with the override swallowed by --set."""
    from mergebench.cli.zoo import main

    monkeypatch.chdir(work)
    before = tree_hash(work)
    code = main(["--set", "text", "nosuch=1", "--cache-dir", str(work / "cache")])
    outcome = Outcome(code, capsys.readouterr().err)
    assert_one_line_error(outcome, "Could not override 'nosuch'")
    assert tree_hash(work) == before
    assert not (work / "cache").exists()


@pytest.mark.parametrize("bad", ["0", "-2", "two", "true"])
def test_zoo_bad_workers_fails_before_anything_is_written(work, capsys, monkeypatch, bad):
    from mergebench.cli.zoo import main

    monkeypatch.chdir(work)
    before = tree_hash(work)
    code = main(["--set", "vision", f"zoo.workers={bad}", "--cache-dir", str(work / "cache")])
    outcome = Outcome(code, capsys.readouterr().err)
    assert_one_line_error(outcome, "zoo.workers: ", "(a positive integer, or null)")
    assert tree_hash(work) == before
    assert not (work / "cache").exists()


# --- round 3 (issue 26): the run's own settings, checked before any work -----------------------
@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("seed=abc", "seed: expected an integer >= 0, got 'abc'"),  # was int()'s ValueError
        ("seed=-1", "seed: -1 must be at least 0"),  # was a ValueError from the splits
        ("seed=1.5", "seed: expected an integer >= 0, got 1.5"),  # used seed 1's zoo, stored 1.5
        ("seed=true", "seed: expected an integer >= 0, got True"),
        ("threads=-3", "threads: -3 must be at least 1"),  # was torch's RuntimeError
        ("threads=0", "threads: 0 must be at least 1"),
        ("zoo.workers=0", "zoo.workers: 0 (a positive integer, or null)"),  # the zoo's own check
        ("eval.batch_size=2.5", "eval.batch_size: expected an integer >= 1, got 2.5"),
        ("taskset.tasks=[]", "taskset.tasks: expected a non-empty list"),  # blamed `finetuned`
        # Collapsed to one task and stored "averaging" of one model as a merge.
        ("taskset.tasks=[rt_sentiment,rt_sentiment]", "task 'rt_sentiment' is listed twice"),
        ("method=../model/minilm", "method: 'minilm' is not a method"),  # escaped conf/method/
    ],
)
def test_bench_run_settings(bench_cli, override, says):
    assert_one_line_error(bench_cli(override), says)


def test_bench_number_with_too_many_digits(bench_cli):
    # Hydra's parser raised Python's int-string limit ValueError with a traceback.
    outcome = bench_cli("method=ties", "method.scaling=" + "1" * 10_000)
    assert_one_line_error(outcome, "method.scaling: a number of 10000 digits")


def test_bench_unimportable_family_class(bench_cli):
    outcome = bench_cli("model._target_=no_such_module.Family")
    assert_one_line_error(outcome, "model._target_: cannot import 'no_such_module.Family'")


def test_bench_model_class_that_is_not_a_family(bench_cli):
    outcome = bench_cli("model._target_=collections.OrderedDict")
    assert_one_line_error(
        outcome, "model._target_: 'collections.OrderedDict' is not a model family"
    )
