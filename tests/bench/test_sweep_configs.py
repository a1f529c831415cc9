"""Sweep presets compose: launchers (joblib, SLURM) and the number-of-tasks multiruns."""

from __future__ import annotations

import importlib.util

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from mergebench.util.config import conf_dir


@pytest.fixture
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir()), version_base=None):
        yield
    GlobalHydra.instance().clear()


def sweep_jobs(experiment: str) -> list[list[str]]:
    """The override lists of every job the preset's multirun launches."""
    cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    overrides = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    (jobs,) = BasicSweeper.split_arguments(
        OverridesParser.create().parse_overrides(overrides), None
    )
    return jobs


def test_local_joblib_launcher(hydra_conf) -> None:
    cfg = compose("config", overrides=["hydra/launcher=local"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.n_jobs == 2 and launcher.backend == "loky"


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="optional extra: pip install -e '.[slurm]'",
)
def test_slurm_launcher(hydra_conf) -> None:
    cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.array_parallelism == 32


@pytest.mark.parametrize(
    ("experiment", "family", "sizes"),
    [
        ("num_tasks_text", "minilm", [2, 3, 4, 5, 6]),
        ("num_tasks_vision", "efficientnet_lite0", [2, 3, 4]),
    ],
)
def test_num_tasks_sweeps(hydra_conf, experiment, family, sizes) -> None:
    jobs = sweep_jobs(experiment)
    assert len(jobs) == 3 * len(sizes)
    seen = set()
    full = compose("config", overrides=[f"+experiment={experiment}"]).taskset.tasks
    for job in jobs:
        cfg = compose("config", overrides=[f"+experiment={experiment}", *job])
        assert cfg.model.name == family and cfg.zoo.multitask is False
        tasks = list(cfg.taskset.tasks)
        assert tasks == list(full[: len(tasks)])  # prefixes of the full task set
        seen.add((cfg.method.name, len(tasks)))
    assert seen == {(m, n) for m in ("emr", "ties", "task_arithmetic") for n in sizes}


@pytest.mark.parametrize("experiment", ["fig5_analysis", "hparam_val"])
def test_experiment_presets_compose(hydra_conf, experiment) -> None:
    cfg = compose("config", overrides=[f"+experiment={experiment}"])
    assert cfg.experiment_job in ("fig5", "hparam")
