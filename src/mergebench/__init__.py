"""mergebench: a benchmark harness for model merging (EMR-Merging and friends)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergebench.util.errors import MergeBenchError
from mergebench.util.version import __version__

if TYPE_CHECKING:
    from mergebench.api import merge, merge_pool
    from mergebench.results import MergeResult, load_result

__all__ = ["MergeBenchError", "MergeResult", "__version__", "load_result", "merge", "merge_pool"]

# The merge API pulls in torch: imported on first use, so `import mergebench` (and every
# console script's start) stays light and a Ctrl-C while starting is handled.
_LAZY = {
    "merge": "mergebench.api",
    "merge_pool": "mergebench.api",
    "MergeResult": "mergebench.results",
    "load_result": "mergebench.results",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mergebench' has no attribute {name!r}")
