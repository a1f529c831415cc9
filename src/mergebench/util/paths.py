"""Where mergebench caches what it builds: `$MERGEBENCH_CACHE`, else ~/.cache/mergebench."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("MERGEBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mergebench"
