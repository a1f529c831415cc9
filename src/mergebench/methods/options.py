"""Method options: their one declaration (`option`) and the checks, in one place.

A method declares each option once, as a class attribute of its `Method` subclass:
`k: float = option(fraction)`; its defaults live in `conf/method/<name>.yaml`. A check
takes the method's name, the option's name and the value as configured (plus the
declaration's settings), returns the value to use, and raises a `MergeBenchError` naming
`<method>.<option>` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from mergebench.util.errors import MergeBenchError

# check(method, option, value, **settings) -> the value to use
Check = Callable[..., Any]
# also(where, given, value, earlier): a further condition on the checked `value` ("where"
# is `<method>.<option>`, `given` the value as configured, `earlier` the checked values
# of the options declared before it).
Also = Callable[[str, Any, Any, Mapping[str, Any]], None]


class Option:
    """One method option, as its class declares it (see `option`)."""

    def __init__(
        self, check: Check | None, settings: dict[str, Any], also: Also | None, record_checked: bool
    ) -> None:
        self.name = ""  # set by the class statement (__set_name__)
        self.check, self.settings, self.also = check, settings, also
        self.record_checked = record_checked

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def checked(self, method: str, given: Any, earlier: Mapping[str, Any]) -> Any:
        value = given
        if self.check is not None:
            value = self.check(method, self.name, given, **self.settings)
        if self.also is not None:
            self.also(f"{method}.{self.name}", given, value, earlier)
        return value


def option(
    check: Check | None = None,
    /,
    *,
    also: Also | None = None,
    record_checked: bool = False,
    **settings: Any,
) -> Any:
    """Declare a method option: `check(method, option, value, **settings)` gives the value
    the method uses (None: the value as given), then `also` tests what needs more (a
    bound, an earlier option). A run records the option as given, or as checked with
    `record_checked` (a parsed threshold mapping)."""
    return Option(check, settings, also, record_checked)


def choice(name: str, option: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    if isinstance(value, (list, dict, set)) or value not in allowed:
        raise MergeBenchError(f"{name}.{option}: {value!r} is not one of {list(allowed)}")
    return value


def fraction(
    name: str, option: str, value: Any, low_open: bool = True, high_open: bool = False
) -> float:
    if isinstance(value, bool):
        raise MergeBenchError(f"{name}.{option}: {value!r} is not a number")
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise MergeBenchError(f"{name}.{option}: {value!r} is not a number") from None
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise MergeBenchError(f"{name}.{option}: {value} is outside {interval}")
    return value


# Larger options overflow float32 weights (max 3.4e38) once multiplied by a task vector.
NUMBER_LIMIT = 1e30


def number(name: str, option: str, value: Any) -> float:
    """A finite number of sensible size: nan, inf and |x| > 1e30 (which turn float32
    weights into inf or nan) are errors naming the option."""
    if isinstance(value, bool):
        raise MergeBenchError(f"{name}.{option}: {value!r} is not a number")
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError):
        raise MergeBenchError(f"{name}.{option}: {value!r} is not a number") from None
    if not math.isfinite(result):
        raise MergeBenchError(f"{name}.{option}: {value!r} is not a finite number")
    if abs(result) > NUMBER_LIMIT:
        raise MergeBenchError(
            f"{name}.{option}: {value!r} is too large (|x| > {NUMBER_LIMIT:g} overflows "
            "float32 weights)"
        )
    return result


def flag(name: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise MergeBenchError(f"{name}.{option}: {value!r} is not true/false")
    return value


def method_name(method: str, option: str, value: Any) -> str:
    """The name of another method (`dare.base`, `mask_rescale.base`): a non-empty string
    here; whether such a method exists is for the registry to say when it builds it."""
    if not isinstance(value, str) or not value.strip():
        raise MergeBenchError(
            f"{method}.{option}: expected a method name (e.g. ties), got {value!r}"
        )
    return value


def params_mapping(method: str, option: str, value: Any) -> dict[str, Any]:
    """Another method's options, as a mapping (null: that method's defaults)."""
    return dict(value or {})


def integer(
    method: str, option: str, value: Any, minimum: int = 1, allow_none: bool = False
) -> int | None:
    """An int option `>= minimum` (or null where allowed), else an error naming it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise MergeBenchError(f"{method}.{option}: {value!r} is not {what}")
    return value
