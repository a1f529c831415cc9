"""One registry: the config name (`conf/method/<name>.yaml`) is the method's name everywhere.

A method is its config file (every option with its default; defaults live in YAML, not in
code) and its module `mergebench.methods.<name>`, which defines the `Method` subclass whose
`name` is `<name>`. Adding a method is adding those two files. `build_method` rejects
options the config does not declare, so a typo never passes silently.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from mergebench.methods.base import Method
from mergebench.util.config import group_options, load_group
from mergebench.util.errors import MergeBenchError


def method_names() -> list[str]:
    """Every method with a config file, in alphabetical order."""
    return group_options("method")


class _Names:
    """`METHODS`: the method names (a live view of `conf/method/`)."""

    def __iter__(self):
        return iter(method_names())

    def __contains__(self, name: object) -> bool:
        return name in method_names()

    def __len__(self) -> int:
        return len(method_names())


METHODS = _Names()


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise MergeBenchError(
            f"method: unknown method {name!r} (choose from {', '.join(method_names())})"
        )
    try:
        module = importlib.import_module(f"mergebench.methods.{name}")
    except ModuleNotFoundError as err:
        raise MergeBenchError(
            f"method {name}: no module mergebench.methods.{name} ({err})"
        ) from None
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, Method) and getattr(cls, "name", None) == name:
            return cls
    raise MergeBenchError(
        f"method {name}: mergebench.methods.{name} defines no Method named {name!r}"
    )


def method_defaults(name: str) -> dict[str, Any]:
    method_class(name)  # unknown names fail here with the list of methods
    defaults = load_group("method", name)
    defaults.pop("name", None)
    return defaults


def build_method(name: str, **params: Any) -> Method:
    """Instantiate method `name` with its config defaults overridden by `params`."""
    defaults = method_defaults(name)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise MergeBenchError(
            f"method {name}: unknown option {unknown[0]!r} (options: {', '.join(sorted(defaults))})"
        )
    return method_class(name)(**{**defaults, **params})


def method_label(name: str, params: Mapping[str, Any] | None = None) -> str:
    """The leaderboard label of method `name` with `params` over its defaults."""
    return method_class(name).label({**method_defaults(name), **dict(params or {})})
