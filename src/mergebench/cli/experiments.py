"""`python -m mergebench.cli.experiments +experiment=...`: paper experiments that are more
than one benchmark run (Fig. 5 weight analysis, validation-split selection)."""

from __future__ import annotations

from typing import Any

import hydra

from mergebench.bench.experiments import run
from mergebench.cli.common import check_top_level_keys, fail, run_hydra_app
from mergebench.util.config import conf_dir
from mergebench.util.errors import MergeBenchError


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def _app(cfg: Any) -> None:
    try:
        check_top_level_keys(cfg)  # `+k=0.1` must be method.k=0.1
        run(cfg)
    except MergeBenchError as exc:
        fail("mergebench-experiment", str(exc))


def main() -> None:
    run_hydra_app(_app)


if __name__ == "__main__":
    main()
