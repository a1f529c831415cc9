"""mergebench: a benchmark harness for model merging (EMR-Merging and friends)."""

__version__ = "0.1.0"

from mergebench.api import merge, merge_pool  # noqa: E402
from mergebench.errors import MergeBenchError  # noqa: E402
from mergebench.results import MergeResult, load_result  # noqa: E402

__all__ = ["MergeBenchError", "MergeResult", "__version__", "load_result", "merge", "merge_pool"]
