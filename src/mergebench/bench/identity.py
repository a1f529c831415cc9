"""What a benchmark run's identity leaves out.

A run is stored under the hash of its resolved config (`report.store.identity`). The keys
below (dotted paths of `conf/config.yaml`) say where and how a run reports or where caches
live, not what it computes: runs that differ only in these share a hash, so a resumed sweep
skips them. The zoo's signature is in the config instead of `zoo.dir`, so re-trained
checkpoints give new hashes. Changing this set changes stored hashes: stores written before
would no longer resume.
"""

from __future__ import annotations

VOLATILE_KEYS = frozenset(
    {
        "hydra",
        "force",
        "logger",
        "store",
        "db",
        "paths",
        "output_dir",
        "out_dir",
        "outputs",
        "save_result",
        "progress",
        "threads",
        "device",
        "wandb",
        "sweep_id",
        "num_workers",
        "references",
        "board",  # a variant's board group (bench/variants.py): which script runs it
        # The code that reads a model config (added after runs were stored): a run's
        # identity is its model's name, checkpoints and options.
        "model._target_",
        "model.source",
        "zoo.dir",
        "zoo.build_missing",
        "zoo.workers",
        "eval.batch_size",
    }
)
