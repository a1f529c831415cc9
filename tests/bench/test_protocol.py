"""The selection protocol: options chosen on validation, structure used where exact."""

from __future__ import annotations

import pytest
import torch
from fake_job import FakeJob, bench_cfg, stored_runs

import mergebench
from mergebench.bench import job
from mergebench.bench.protocol import UserSettings, run_label, searchable, select, user_settings
from mergebench.engine.pool import ModelPool
from mergebench.report.records import TaskScore
from mergebench.util.errors import MergeBenchError

# `config_hash` of the FakeJob runs `ties` and `ties (k=0.1)` (tests/fake_job.py),
# as stored before the option semantics changed.
# Re-pinned 2026-12-06 when the text zoo began training on one thread per model
# (`model.finetune.threads: 1` is part of the zoo config, so of every text run's identity; its
# checkpoints came out the same, and stored text runs rerun once to the same numbers).
PINNED_TIES = "12c2cba03b26437118ab0cc6672bae441f2b13e878891a9df892815fc1bd3951"
PINNED_TIES_K01 = "5ab57eb16ddc29914c27bbfc02a64acfbdb31f4fbca4345b093205b87e3d727f"


@pytest.fixture
def pool():
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(64, generator=g), "b": torch.randn(8, generator=g)}
    finetuned = {
        t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        for t in ("a", "b", "c")
    }
    return ModelPool.from_checkpoints(pre, finetuned)


def closeness_to(target: dict[str, torch.Tensor]):
    """A validation 'score' that peaks where the merged weights equal `target`."""
    calls = []

    def validate(result):
        state = result.state_dict("a")
        distance = sum(float((state[k] - v).norm()) for k, v in target.items())
        calls.append(distance)
        return [TaskScore(t, "accuracy", 1.0 / (1.0 + distance), "validation") for t in "abc"]

    validate.calls = calls
    return validate


def test_task_arithmetic_scaling_selected_with_one_merge(pool):
    target = mergebench.merge_pool("task_arithmetic", pool, progress=False, scaling=0.4)
    validate = closeness_to(target.state_dict("a"))
    selection = select("task_arithmetic", {"scaling": 0.3}, pool, validate)
    assert selection.selected == {"scaling": 0.4}
    assert selection.merges == 1  # scaling is a post-multiplier: one merge serves the grid
    assert len(selection.candidates) == len(validate.calls) == 10
    assert [c["params"]["scaling"] for c in selection.candidates][:3] == [0.1, 0.2, 0.3]


def test_rescaled_merge_matches_a_direct_merge(pool):
    from mergebench.bench.protocol import _Rescaled
    from mergebench.engine.keyplan import plan_keys

    at_one = mergebench.merge_pool("ties", pool, progress=False, scaling=1.0)
    direct = mergebench.merge_pool("ties", pool, progress=False, scaling=0.7)
    scaled = _Rescaled(at_one, pool, plan_keys(pool).merged).at(0.7)
    for key, value in direct.state_dict("a").items():
        assert torch.allclose(scaled.state_dict("a")[key], value, atol=1e-6), key


def test_ties_searches_k_times_scaling_with_one_merge_per_k(pool):
    target = mergebench.merge_pool("ties", pool, progress=False, k=0.3, scaling=0.7)
    selection = select("ties", {}, pool, closeness_to(target.state_dict("a")))
    assert selection.selected == {"k": 0.3, "scaling": 0.7}
    assert selection.merges == 3 and len(selection.candidates) == 15


def test_options_the_user_set_are_fixed_not_searched():
    grid, per_task = searchable("ties", {"k": 0.1, "scaling": 0.3})
    assert grid == {"scaling": [0.1, 0.3, 0.5, 0.7, 1.0]}  # k is fixed
    assert searchable("task_arithmetic", {"scaling": 0.5}) == ({}, {})
    assert searchable("emr", {}) == ({}, {})  # tuning-free


def test_tall_masks_pick_each_tasks_threshold_by_its_own_score(pool):
    # Task a scores best at 0.4, task b at 0.2, task c is flat (the first value wins).
    def validate(result):
        threshold = result.params["threshold"]
        return [
            TaskScore("a", "accuracy", 1 - abs(threshold - 0.4), "validation"),
            TaskScore("b", "accuracy", 1 - abs(threshold - 0.2), "validation"),
            TaskScore("c", "accuracy", 0.5, "validation"),
        ]

    selection = select("tall_masks", {}, pool, validate)
    assert selection.selected == {"threshold": {"a": 0.4, "b": 0.2, "c": 0.2}}
    assert selection.merges == 5


def test_mask_rescale_takes_its_base_methods_selection(pool):
    target = mergebench.merge_pool("ties", pool, progress=False, k=0.1, scaling=1.0)
    validate = closeness_to(target.state_dict("a"))
    memo: dict = {}
    selection = select("mask_rescale", {"base": "ties", "base_params": None}, pool, validate,
                       memo=memo)  # fmt: skip
    assert selection.selected == {"base_params": {"k": 0.1, "scaling": 1.0}}
    # The base's selection is kept: `ties` itself is not searched again.
    calls = len(validate.calls)
    assert select("ties", {}, pool, validate, memo=memo).selected == {"k": 0.1, "scaling": 1.0}
    assert len(validate.calls) == calls


# --- option semantics: what the user sets is fixed, named and part of the identity ------------
def test_command_line_settings_are_read_from_the_overrides():
    settings = user_settings(["method=ties", "method.k=0.2", "method.search.scaling=[0.5]",
                              "+method.base_params={k: 0.1}", "~method.aggregate", "seed=1"])  # fmt: skip
    assert settings.options == {"k", "base_params.k"}
    assert settings.grids == {"scaling"}
    assert settings.nested("base_params").options == {"k"}
    assert user_settings([]) == UserSettings()


def test_an_option_set_to_its_default_is_fixed_and_named():
    fixed = UserSettings(frozenset({"k", "scaling"}))
    assert searchable("ties", {"k": 0.2, "scaling": 0.3}, fixed.options) == ({}, {})
    assert run_label("ties", {"k": 0.2, "scaling": 0.3}, None, fixed) == "ties (k=0.2, scaling=0.3)"
    # Unset and at its default: searched, and the label is the one stored runs carry.
    assert run_label("ties", {"k": 0.2, "scaling": 0.3}, None) == "ties"
    base = UserSettings(frozenset({"base_params.k"}))
    assert run_label("dare", {"base": "ties", "base_params": {"k": 0.2}}, None, base) == (
        "dare (ties) (base_params.k=0.2)"
    )


def test_a_command_line_grid_replaces_the_configs(pool):
    search = {"k": [], "scaling": [0.5, 1.0]}  # k's search turned off, scaling's replaced
    assert searchable("ties", {}, search=search) == ({"scaling": [0.5, 1.0]}, {})
    target = mergebench.merge_pool("ties", pool, progress=False, scaling=1.0)
    validate = closeness_to(target.state_dict("a"))
    selection = select("ties", {}, pool, validate, search=search)
    assert selection.selected == {"scaling": 1.0}
    assert [c["params"] for c in selection.candidates] == [{"scaling": 0.5}, {"scaling": 1.0}]
    settings = UserSettings(grids=frozenset({"k", "scaling"}))
    assert run_label("ties", {}, search, settings) == "ties (search.k=[], search.scaling=[0.5, 1])"
    with pytest.raises(MergeBenchError, match=r"search\.kk is not an option"):
        searchable("ties", {}, search={"kk": [0.1]})


def _run(tmp_path, *overrides: str) -> dict:
    """One `mergebench` job (FakeJob: no zoo, no real merge) with these command-line overrides."""
    return job.run(bench_cfg(tmp_path, "method=ties", *overrides), overrides=overrides)


def test_the_user_setting_a_default_is_not_skipped_as_the_stored_search(tmp_path, monkeypatch):
    """`mergebench method=ties method.k=0.1,0.2` once skipped k=0.2 (the default) as the
    stored `ties` row, whose k was searched; and a command-line grid was ignored."""
    fake = FakeJob(monkeypatch)
    assert _run(tmp_path)["label"] == "ties"
    assert _run(tmp_path)["skipped"] is True
    assert _run(tmp_path, "method.k=0.2")["label"] == "ties (k=0.2)"
    assert _run(tmp_path, "method.scaling=0.3")["label"] == "ties (scaling=0.3)"
    assert _run(tmp_path, "method.search.k=[0.1,0.2]")["label"] == "ties (search.k=[0.1, 0.2])"
    assert _run(tmp_path, "method.search.k=[]")["label"] == "ties (search.k=[])"
    assert _run(tmp_path, "method.k=0.2")["skipped"] is True  # its own identity resumes
    assert len(fake.merges) == 5
    runs = stored_runs(tmp_path)
    assert len({r["config_hash"] for r in runs}) == 5


def test_a_run_with_nothing_set_keeps_the_hash_stored_before(tmp_path, monkeypatch):
    FakeJob(monkeypatch)
    _run(tmp_path)
    _run(tmp_path, "method.k=0.1")  # away from the default: named, as before
    hashes = {r["label"]: r["config_hash"] for r in stored_runs(tmp_path)}
    # Computed with the code before option semantics changed (the default board resumes).
    assert hashes == {"ties": PINNED_TIES, "ties (k=0.1)": PINNED_TIES_K01}
