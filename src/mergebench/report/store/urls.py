"""Store URLs: telling a URL from a path, the file of a `sqlite:///` URL, and redaction.

A store URL may carry a password (`postgresql://me:secret@host/db`, `?password=...`, or a
libpq string `host=h password=secret`). No message, log line, stored config or W&B config
shows it: `redact` works by pattern on any text, so a URL that no parser accepts (and a
driver's error that echoes it) is covered too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from mergebench.util.errors import MergeBenchError

HIDDEN = "***"

# `scheme://user:` then the password up to the last `@` of the token (a password may hold an
# unescaped `@` or `/`: hiding too much is safe, hiding too little is not).
_URL_PASSWORD = re.compile(r"""([A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@'"]*:)[^\s'"]*@""")
# `password=...` in a query string or a libpq connection string (quoted values included).
_KEY_PASSWORD = re.compile(r"""(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&'"]*)""")


def passwords_in(url: str) -> list[str]:
    """The password of a store URL or libpq string as written and percent-decoded, found
    leniently (everything between `scheme://user:` and the last `@`), for hiding it."""
    found = []
    rest = url.split("://", 1)[1] if "://" in url else ""
    if "@" in rest and ":" in rest.rsplit("@", 1)[0]:
        found.append(rest.rsplit("@", 1)[0].split(":", 1)[1])
    found += [m.group(2).strip("'") for m in _KEY_PASSWORD.finditer(url)]
    found = [p for p in found if p]
    return sorted({*found, *(unquote(p) for p in found)}, key=len, reverse=True)


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` with every password of a URL or connection string in it replaced by ***, and
    every one of `secrets` (passwords known to be there, e.g. echoed by a driver)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, HIDDEN)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{HIDDEN}@", text)
    return _KEY_PASSWORD.sub(lambda m: f"{m.group(1)}{HIDDEN}", text)


def redact_url(url: str) -> str:
    """`url` without its password (for messages and logs), parsable or not."""
    return redact(url, passwords_in(url))


def redact_secrets(value: Any) -> Any:
    """JSON-like data (a config) with every password hidden: in strings that hold a URL or
    connection string, and as the value of any key named `password`."""
    if isinstance(value, Mapping):
        return {
            k: HIDDEN
            if str(k).lower() == "password" and isinstance(v, str) and v
            else redact_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_secrets(v) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


def is_url(target: str | os.PathLike[str]) -> bool:
    return isinstance(target, str) and "://" in target


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def sqlite_path(url: str) -> Path:
    """The file of a `sqlite:///relative/path` or `sqlite:////absolute/path` URL (the
    SQLAlchemy convention: what follows the third slash is the path)."""
    rest = url.split("://", 1)[1]
    if not rest.startswith("/") or len(rest) < 2:
        raise MergeBenchError(
            f"store {redact_url(url)}: expected sqlite:///relative/path or sqlite:////absolute/path"
        )
    return Path(unquote(rest[1:]))
