"""One exception type for every user-facing mistake: the CLI prints it on one line, exit 2."""

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class MergeBenchError(Exception):
    """Bad input (file, key or option) that the user can fix; the message names the culprit."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def construct(factory: Callable[..., T], where: str, *args: Any, **options: Any) -> T:
    """`factory(*args, **options)` where `options` come from a config (`where` names it): an
    unknown or missing option (the TypeError Python raises) becomes a MergeBenchError."""
    try:
        return factory(*args, **options)
    except TypeError as err:
        raise MergeBenchError(f"{where}: {err}") from err
