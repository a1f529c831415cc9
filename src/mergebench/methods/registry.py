"""One registry: the config name (`conf/method/<name>.yaml`) is the method's name everywhere.

Defaults live in the YAML file, not in code; `build_method` rejects options the file does
not declare, so a typo never passes silently.
"""

from __future__ import annotations

import importlib
from typing import Any

from mergebench.config import load_group
from mergebench.errors import MergeBenchError

# name -> "module:Class", imported on first use (data-dependent methods pull in more).
METHODS: dict[str, str] = {
    "weight_averaging": "mergebench.methods.weight_averaging:WeightAveraging",
    "task_arithmetic": "mergebench.methods.task_arithmetic:TaskArithmetic",
    "ties": "mergebench.methods.ties:Ties",
    "dare": "mergebench.methods.dare:Dare",
    "emr": "mergebench.methods.emr:EMR",
    "mask_rescale": "mergebench.methods.mask_rescale:MaskRescale",
    "regmean": "mergebench.methods.regmean:RegMean",
    "fisher": "mergebench.methods.fisher:Fisher",
    "adamerging": "mergebench.methods.adamerging:AdaMerging",
}


def method_class(name: str) -> type:
    if name not in METHODS:
        raise MergeBenchError(f"method: unknown method {name!r} (choose from {', '.join(METHODS)})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def method_defaults(name: str) -> dict[str, Any]:
    method_class(name)  # unknown names fail here with the list of methods
    defaults = load_group("method", name)
    defaults.pop("name", None)
    return defaults


def build_method(name: str, **params: Any):
    """Instantiate method `name` with its config defaults overridden by `params`."""
    defaults = method_defaults(name)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise MergeBenchError(
            f"method {name}: unknown option {unknown[0]!r} (options: {', '.join(sorted(defaults))})"
        )
    return method_class(name)(**{**defaults, **params})
