"""Tied keys of a result: an output matrix the base stores as a second name of its input
embedding (`extra["tied_keys"] = {alias: key}`, see `engine.llm`) was merged once and is
written again under its own name, sharing the tensor, as the base stores it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def add_tied_keys(
    state: dict[str, torch.Tensor], extra: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    for alias, key in (extra.get("tied_keys") or {}).items():
        if key in state:
            state[alias] = state[key]
    return state
