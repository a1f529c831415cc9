"""One exception type for every user-facing mistake: the CLI prints it on one line, exit 2."""


class MergeBenchError(Exception):
    """Bad input (file, key or option) that the user can fix; the message names the culprit."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
