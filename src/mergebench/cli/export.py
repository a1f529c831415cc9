"""`mergebench-export`: a merge result as a folder `transformers` loads without mergebench.

    mergebench-export results/ties out/ties-llama
    mergebench-export results/emr out/emr --task math
    mergebench-export results/emr out/emr --all-tasks          # out/emr/<task>/ per task
    mergebench-export results/ties out/ties --push-to-hub me/ties-llama

See `mergebench.results.export` for what the folder holds.
"""

from __future__ import annotations

import argparse
import sys

from mergebench.cli.common import fail
from mergebench.results.export import export_result, push_to_hub
from mergebench.results.shards import DEFAULT_SHARD_BYTES, parse_size
from mergebench.util.errors import MergeBenchError

PROGRAM = "mergebench-export"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    parser.add_argument("result_dir", metavar="RESULT_DIR", help="a saved merge result")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the save_pretrained folder to write")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--task", help="the task's model (required for task-conditioned results)")
    which.add_argument("--all-tasks", action="store_true", help="one folder per task in OUT_DIR")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this hub repo")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--shard-size", default=str(DEFAULT_SHARD_BYTES),
                        help="safetensors shards of at most this size (default 4GB)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.push_to_hub is not None and (args.all_tasks or not args.push_to_hub.strip()):
            raise MergeBenchError(
                "--push-to-hub: give one repository for one folder (not with --all-tasks)"
            )
        folders = export_result(
            args.result_dir,
            args.out_dir,
            task=args.task,
            all_tasks=args.all_tasks,
            force=args.force,
            shard_size=parse_size(args.shard_size, "--shard-size"),
        )
        for folder in folders:
            print(f"{PROGRAM}: wrote {folder}")
        if args.push_to_hub is not None:
            url = push_to_hub(folders[0], args.push_to_hub)
            print(f"{PROGRAM}: uploaded to {args.push_to_hub} ({url})")
    except MergeBenchError as err:
        fail(PROGRAM, str(err))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
