"""The benchmark's variants (`conf/variant/<name>.yaml`) by board group: each variant says
which group runs it (`board:`), so a new method needs a variant file, not a script edit.

Groups, in the order `scripts/run_bench.py` runs them:
- `default`: the EMR paper's Tables 7 and 8 rows (`make bench`);
- `dare`: DARE on task arithmetic and on TIES, `drop` selected on top of the base's
  selection (`make bench`);
- `new`: the 2024-2025 methods papers compare EMR against (`make bench`);
- `mergekit`: mergekit's methods that take any number of tasks (`make bench-all`);
- `data`: the data-dependent methods' CPU presets (`make bench-all`, a multirun of their own).

`board` is not part of a run's identity (`bench.identity.VOLATILE_KEYS`).
"""

from __future__ import annotations

from mergebench.util.config import conf_dir, group_options, load_group
from mergebench.util.errors import MergeBenchError

GROUPS = ("default", "dare", "new", "mergekit", "data")


def variant_groups() -> dict[str, str]:
    """Variant name -> its board group, for every file of `conf/variant/`."""
    groups = {}
    for name in group_options("variant"):
        group = load_group("variant", name).get("board")
        if group not in GROUPS:
            raise MergeBenchError(
                f"{conf_dir() / 'variant' / name}.yaml: board: {group!r} is not one of "
                f"{', '.join(GROUPS)}"
            )
        groups[name] = group
    return groups


def variants_in(*groups: str) -> list[str]:
    """The variants of `groups`, group by group in the order given, by name within one."""
    by_group = variant_groups()
    return [
        name for group in groups for name in sorted(n for n, g in by_group.items() if g == group)
    ]
