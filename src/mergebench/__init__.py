"""mergebench: a benchmark harness for model merging (EMR-Merging and friends)."""

from mergebench.api import merge, merge_pool
from mergebench.results import MergeResult, load_result
from mergebench.util.errors import MergeBenchError
from mergebench.util.version import __version__

__all__ = ["MergeBenchError", "MergeResult", "__version__", "load_result", "merge", "merge_pool"]
