"""Skips for tests of packaged data that only root can install (Debian packages through
`make data`); pip and npm data are always installed by `make setup` / `make data`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergebench.data.embedded.packaged_vision import OPENCLIPART_DEFAULT, OPENCLIPART_ENV


def needs_openclipart(name: str = "openclipart") -> None:
    """Skip (with the reason) a test of `openclipart` where Debian's openclipart-png is
    missing: `make data` installs it, which needs root and apt-get."""
    if name != "openclipart":
        return
    root = Path(os.environ.get(OPENCLIPART_ENV, OPENCLIPART_DEFAULT))
    if not (root / "animals").is_dir():
        pytest.skip(
            f"Debian's openclipart-png is missing (no {root / 'animals'}) and `make data` could "
            "not install it (needs root: apt-get install openclipart-png); or set "
            f"{OPENCLIPART_ENV} to its png folder"
        )
