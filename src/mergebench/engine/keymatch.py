"""How two checkpoints' key names relate: exclude patterns, key prefixes, what differs.

Pure functions over key names (no tensors are read). The key plan and the key alignment
(`align.py`) use them to decide, and to say in one line why two checkpoints do not match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mergebench.util.errors import MergeBenchError


def compile_patterns(patterns: Iterable[str]) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise MergeBenchError(f"exclude: invalid regex {pattern!r} ({err})") from None
    return compiled


def is_excluded(key: str, patterns: list[re.Pattern[str]]) -> bool:
    # fullmatch: `classifier\..*` must not catch `bert.classifier_proj.weight`.
    return any(p.fullmatch(key) for p in patterns)


@dataclass(frozen=True)
class Prefix:
    """One consistent prefix between a checkpoint and the pretrained model: `strip` it from
    every checkpoint key that has it, or `add` it to every key."""

    action: str  # "strip" | "add"
    prefix: str  # ends with "."

    def rules(self) -> dict[str, str]:
        """The same renaming as a `key_map` ({from_prefix: to_prefix})."""
        return {self.prefix: ""} if self.action == "strip" else {"": self.prefix}

    def rename(self, key: str) -> str:
        if self.action == "add":
            return self.prefix + key
        return key[len(self.prefix) :] if key.startswith(self.prefix) else key

    def says(self, name: str, pre_name: str) -> str:
        if self.action == "strip":
            return f"{name} keys carry the prefix {self.prefix!r} that {pre_name} lacks"
        return f"{pre_name} keys carry the prefix {self.prefix!r} that {name} lacks"

    def option(self) -> str:
        if self.action == "strip":
            return f"strip_prefix={self.prefix!r}"
        return f"key_map={{'': {self.prefix!r}}}"


@dataclass(frozen=True)
class PrefixFit:
    """A candidate prefix and the pretrained keys it still leaves unmatched."""

    prefix: Prefix
    missing: list[str]

    @property
    def fits(self) -> bool:
        return not self.missing


def _candidates(pre: list[str], keys: list[str]) -> list[Prefix]:
    """Prefixes (whole dotted components) whose removal from one side names a key of the
    other side, in key order."""
    found: dict[Prefix, None] = {}
    for action, side, other in (("strip", keys, set(pre)), ("add", pre, set(keys))):
        for key in side:
            for i, char in enumerate(key):
                if char == "." and key[i + 1 :] in other:
                    found.setdefault(Prefix(action, key[: i + 1]))
    return list(found)


def renamed_keys(prefix: Prefix, keys: Iterable[str]) -> dict[str, str] | None:
    """{new name: key} under `prefix`, or None when two keys would get one name (a
    checkpoint holding both `bert.x` and `x`)."""
    renamed: dict[str, str] = {}
    for key in keys:
        new = prefix.rename(key)
        if new in renamed:
            return None
        renamed[new] = key
    return renamed


def prefix_fits(backbone: list[str], pre: list[str], keys: list[str]) -> list[PrefixFit]:
    """Every usable candidate prefix, best first (fewest pretrained `backbone` keys left
    missing, then the shortest prefix, then key order)."""
    fits = []
    for prefix in _candidates(pre, keys):
        renamed = renamed_keys(prefix, keys)
        if renamed is not None:
            fits.append(PrefixFit(prefix, [k for k in backbone if k not in renamed]))
    return sorted(fits, key=lambda f: (len(f.missing), len(f.prefix.prefix)))


def _count(keys: list[str]) -> str:
    return f"{len(keys)} key" if len(keys) == 1 else f"{len(keys)} keys"


def examples(keys: list[str], count: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:count])
    return shown + (", ..." if len(keys) > count else "")


def head_pattern(keys: list[str], other: Iterable[str]) -> str | None:
    """An exclude regex for `keys` when they look like a task head: they all live under one
    or two top-level modules that the other checkpoint does not have at all."""
    tops = sorted({k.split(".", 1)[0] for k in keys if "." in k})
    if not tops or len(tops) > 2 or any("." not in k for k in keys):
        return None
    other_tops = {k.split(".", 1)[0] for k in other}
    if any(t in other_tops for t in tops):
        return None
    names = "|".join(re.escape(t) for t in tops)
    return rf"{names}\..*" if len(tops) == 1 else rf"({names})\..*"


def key_difference(
    pre_keys: list[str], keys: list[str], patterns: list[re.Pattern[str]]
) -> tuple[list[str], list[str]]:
    """The pretrained keys a checkpoint lacks, and its keys the pretrained lacks (neither
    excluded), each in its checkpoint's key order."""
    have, pre_set = set(keys), set(pre_keys)
    missing = [k for k in pre_keys if k not in have and not is_excluded(k, patterns)]
    extra = [k for k in keys if k not in pre_set and not is_excluded(k, patterns)]
    return missing, extra


def describe_mismatch(
    name: str,
    pre_name: str,
    task: str,
    pre_keys: list[str],
    keys: list[str],
    patterns: list[re.Pattern[str]],
) -> str:
    """One line saying how checkpoint `name` (task `task`) differs from the pretrained one.
    Names the prefix that would fix it, else the exclude pattern when the difference looks
    like a task head, else counts and examples of both sides."""
    missing, extra = key_difference(pre_keys, keys, patterns)
    backbone = [k for k in pre_keys if not is_excluded(k, patterns)]
    fits = prefix_fits(backbone, pre_keys, keys)
    if fits and fits[0].fits:
        found = fits[0].prefix
        return (
            f"{found.says(name, pre_name)} (task {task!r}); rerun with {found.option()} "
            "(result keys are named as in the pretrained model)"
        )
    if fits and len(fits[0].missing) < len(missing) and len(fits[0].missing) < len(backbone) / 2:
        partial = fits[0]
        renamed = renamed_keys(partial.prefix, keys) or {}
        pattern = head_pattern(partial.missing, renamed)
        advice = (
            "name the renaming with key_map=..., or exclude them if they are heads"
            if pattern is None
            else f"if they are a head the fine-tuned models do not use, exclude them "
            f"(exclude=[{pattern!r}], heads_separate=true)"
        )
        return (
            f"{partial.prefix.says(name, pre_name)} (task {task!r}), but even with it "
            f"{_count(partial.missing)} of {pre_name} not in {name}{_eg(partial.missing)}; "
            + advice
        )
    if extra and not missing:
        pattern = head_pattern(extra, pre_keys)
        if pattern is not None:
            return (
                f"{name}: key {extra[0]!r} is not in {pre_name} (task {task!r}); if it is a "
                f"task head, add it to exclude, e.g. exclude=[{pattern!r}]"
            )
    if missing and not extra:
        pattern = head_pattern(missing, keys)
        if pattern is not None:
            return (
                f"{name}: missing key {missing[0]!r} of {pre_name} (task {task!r}); if it is a "
                f"head the fine-tuned models do not use, exclude it (exclude=[{pattern!r}], "
                "heads_separate=true)"
            )
    parts = []
    if len(missing) == 1:
        parts.append(f"missing key {missing[0]!r} of {pre_name}")
    elif missing:
        parts.append(f"{len(missing)} keys of {pre_name} are not in it, e.g. {examples(missing)}")
    if len(extra) == 1:
        parts.append(f"its key {extra[0]!r} is not in {pre_name}")
    elif extra:
        parts.append(f"{len(extra)} of its keys are not in {pre_name}, e.g. {examples(extra)}")
    return f"{name} (task {task!r}): " + "; ".join(parts)


def _eg(keys: list[str]) -> str:
    return f" ({keys[0]!r})" if len(keys) == 1 else f", e.g. {examples(keys)}"
