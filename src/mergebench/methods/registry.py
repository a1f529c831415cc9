"""One registry: the config name (`conf/method/<name>.yaml`) is the method's name everywhere.

A method is its config file (every option with its default and comment, and its `search:`
grid; defaults live in YAML, not in code) and its module `mergebench.methods.<name>`, which
defines the `Method` subclass whose `name` is `<name>` and declares each option once with
its check (`methods/options.py`). Adding a method is adding those two files. A method
rejects options it does not declare, so a typo never passes silently.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Collection, Mapping, Sequence
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
    defaults.pop("search", None)  # the benchmark's validation grid, not an option
    return defaults


def method_search(name: str) -> dict[str, Any]:
    """The options (and values) the benchmark selects on validation for method `name`:
    its config's `search:` section (empty for tuning-free methods)."""
    method_class(name)
    return check_search(name, load_group("method", name).get("search") or {})


def check_search(name: str, search: Any) -> dict[str, Any]:
    """`search` (a config's or the command line's grid) checked against method `name`'s
    options; an empty list turns that option's search off."""
    where = f"conf/method/{name}.yaml"
    if search is None:
        return {}
    if not isinstance(search, Mapping):
        raise MergeBenchError(f"{where}: search must be a mapping of option lists")
    options = set(method_defaults(name))
    for option, values in search.items():
        names = values if option == "per_task" else {option: values}
        for key, grid in names.items() if isinstance(names, Mapping) else []:
            if key not in options:
                raise MergeBenchError(f"{where}: search.{key} is not an option")
            if not isinstance(grid, list):
                raise MergeBenchError(f"{where}: search.{key} must be a list")
    return dict(search)


def build_method(name: str, **params: Any) -> Method:
    """Instantiate method `name` with its config defaults overridden by `params` (a
    composed Hydra config also carries the benchmark's `search` grid: not an option)."""
    params = {k: v for k, v in params.items() if k != "search"}
    return method_class(name)(**{**method_defaults(name), **params})


def method_base_label(name: str, params: Mapping[str, Any] | None = None) -> str | None:
    """The label of the method that `name` is built on (for "X w/ M&R": X's), else None."""
    return method_class(name).base_label({**method_defaults(name), **dict(params or {})})


def method_label(name: str, params: Mapping[str, Any] | None = None) -> str:
    """The leaderboard label of method `name` with `params` over its defaults."""
    return method_class(name).label({**method_defaults(name), **dict(params or {})})


def setting_text(value: Any) -> str:
    """An option's value as a label shows it (floats in `%g`)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def non_default_settings(
    name: str, params: Mapping[str, Any] | None = None, fixed: Collection[str] = ()
) -> list[str]:
    """`option=value` for every option of `params` that differs from method `name`'s
    default or that the user set (`fixed`, whatever its value), and that its label does
    not already spell out; a base method's options as `base_params.option=value` against
    the base's own defaults."""
    cls = method_class(name)
    defaults = method_defaults(name)
    full = {**defaults, **dict(params or {})}
    out = []
    for option, value in full.items():
        if option in cls.label_options:
            continue
        if option == "base_params" and "base" in full:
            base = str(full["base"])
            nested = non_default_settings(
                base, value or {}, [f[len("base_params.") :] for f in fixed
                                    if f.startswith("base_params.")],
            )  # fmt: skip
            base_cls = method_class(base)
            out += [
                f"base_params.{item}"
                for item in nested
                if item.split("=", 1)[0] not in base_cls.label_options
            ]
        elif option in fixed or value != defaults.get(option):
            out.append(f"{option}={setting_text(value)}")
    return out


def variant_label(
    name: str,
    params: Mapping[str, Any] | None = None,
    fixed: Collection[str] = (),
    extra: Sequence[str] = (),
) -> str:
    """The label of a run: the method's own label, plus its non-default or user-set
    (`fixed`) settings and any `extra` ones, e.g. `ties (k=0.1, scaling=0.5)`; a run at
    the defaults is just `ties`."""
    settings = [*non_default_settings(name, params, fixed), *extra]
    label = method_label(name, params)
    return f"{label} ({', '.join(settings)})" if settings else label
