"""One exception type for every user-facing mistake: the CLI prints it on one line, exit 2."""


class MergeBenchError(Exception):
    """Bad input (file, key or option) that the user can fix; the message names the culprit."""
