"""Read a (gzip-)pickled numpy array without running arbitrary code.

Some packaged data sets (animal-mnist) ship their arrays as pickles. A plain `pickle.load`
would run whatever callable the file names; `NumpyOnlyUnpickler` resolves only the few numpy
globals that rebuild a plain array and refuses every other one, so a tampered file fails
with one line instead of executing. Object arrays are refused too: they would carry
arbitrary Python objects.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from mergebench.util.errors import MergeBenchError

try:  # numpy 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.26
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

# What `ndarray.__reduce__` names: the array rebuilder (under its numpy 1 and numpy 2
# module paths), the array class and the dtype class. Nothing else is ever looked up.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _Refused(Exception):
    """A global outside `ALLOWED`; turned into a MergeBenchError naming the file."""


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler whose `find_class` admits only the numpy array rebuilders."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in ALLOWED:
            raise _Refused(f"{module}.{name}")
        return ALLOWED[(module, name)]


def load_numpy_pickle(path: Path) -> np.ndarray:
    """The numeric array pickled (gzip-compressed) in `path`; anything else is refused."""
    try:
        with gzip.open(path, "rb") as f:
            value = NumpyOnlyUnpickler(f).load()
    except _Refused as err:
        raise MergeBenchError(
            f"{path}: refused to unpickle: it names {err}, not a numpy array"
        ) from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise MergeBenchError(f"{path}: not a gzip-pickled numpy array ({err})") from None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise MergeBenchError(f"{path}: expected a numeric numpy array, found {kind}")
    return value


__all__ = ["ALLOWED", "NumpyOnlyUnpickler", "load_numpy_pickle"]
