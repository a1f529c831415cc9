"""`mergebench`: one method on one family and task set, evaluated and stored (a Hydra app).

mergebench                                        # EMR on the text set (MiniLM)
mergebench method=ties model=efficientnet_lite0 taskset=vision
mergebench -m +variant=emr,ties +experiment=bench_text,bench_vision_vit   # a Hydra multirun
(`make bench` runs scripts/run_bench.py: the variants whose `board:` is `default`)
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from mergebench.bench.job import run
from mergebench.cli.common import check_top_level_keys, fail, hydra_overrides, run_hydra_app
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def _app(cfg: DictConfig) -> dict[str, Any]:
    try:
        check_top_level_keys(cfg)  # `+k=0.1` must be method.k=0.1
        return run(cfg, hydra_overrides())  # what the user set is fixed (bench.protocol)
    except MergeBenchError as exc:
        fail("mergebench", str(exc))


def main() -> None:
    run_hydra_app(_app)


if __name__ == "__main__":
    main()
