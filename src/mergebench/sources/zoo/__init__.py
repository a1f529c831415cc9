"""The offline model zoo: fine-tune one model per task, and one multi-task model, from the
packaged pretrained weights, with Lightning; cache and reuse them.

Layout of `<cache>/<family>/` (cache: `--cache-dir`, `zoo.dir`, `$MERGEBENCH_CACHE/zoo`, or
`~/.cache/mergebench/zoo`):
- `pretrained.safetensors`: the backbone as packaged (no head);
- `<task>.safetensors`: the fine-tuned model of one task (backbone + `classifier.*`);
- `multitask/<taskset>/backbone.safetensors` and `multitask/<taskset>/heads/<task>.safetensors`;
- `zoo.json`: per checkpoint, its signature (hash of data fingerprint, seed, model options and
  hyperparameters), data fingerprint, hyperparameters, validation metrics, seconds;
- `references/<taskset>.json`: the reference rows (individual, multi-task, pretrained) on the
  test split with every prediction, evaluated once by `mergebench-zoo` (or the first benchmark
  job) and keyed by the zoo signature.
A checkpoint is reused when its signature matches, so task sets that share tasks (the
number-of-tasks experiment) share checkpoints; anything else is retrained.

Building (`build.ensure_zoo`; one model: `job`, Lightning's loop: `train`, side by side:
`workers`) is apart from reading (`source.ZooSource`, `source.zoo_pool`, `references`);
`manifest` is what both agree on (folder, signatures, `zoo.json`), `settings` the `finetune`
section of a model config.
"""

from __future__ import annotations

from mergebench.sources.zoo.build import ensure_zoo, set_threads
from mergebench.sources.zoo.job import say
from mergebench.sources.zoo.manifest import (
    ZOO_FORMAT,
    family_dir,
    read_manifest,
    save_atomic,
    write_manifest,
    zoo_root,
)
from mergebench.sources.zoo.settings import finetune_settings, multitask_settings
from mergebench.sources.zoo.source import ZooSource, zoo_pool
from mergebench.sources.zoo.workers import zoo_workers

__all__ = [
    "ZOO_FORMAT",
    "ZooSource",
    "ensure_zoo",
    "family_dir",
    "finetune_settings",
    "multitask_settings",
    "read_manifest",
    "save_atomic",
    "say",
    "set_threads",
    "write_manifest",
    "zoo_pool",
    "zoo_root",
    "zoo_workers",
]
