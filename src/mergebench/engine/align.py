"""Key alignment: checkpoints of one model saved under differently prefixed key names.

On the hub a base is often saved as a bare `BertModel` (`embeddings.*`, `encoder.*`) and its
fine-tunes as `BertForSequenceClassification` (`bert.embeddings.*`, ..., `classifier.*`).
Each fine-tuned checkpoint is seen through a renaming view (`CanonicalSource`: names only,
tensors stay where they are and are read lazily) under the pretrained model's key names,
so the merged result is named as the pretrained checkpoint is. Keys outside the prefix (a
fine-tune's `classifier.*`) keep their names: task-specific only if `exclude` says so.

- detected: when a fine-tuned model lacks pretrained keys, the one consistent prefix
  (stripped from, or added to, every key of the fine-tuned model) that makes all the
  pretrained keys not excluded match is used; two such prefixes are refused as ambiguous;
  none leaves the key plan to say what differs.
- `strip_prefix`: a prefix for every fine-tuned model, or {checkpoint: prefix} where a
  checkpoint is a task or `pretrained`; every named checkpoint must have keys with it.
- `key_map`: {from: to} rules for every fine-tuned model, or {checkpoint: {from: to}}:
  `from` is a literal key prefix, or a regex when it starts with `^` (`to` may then use
  `\\1`); each key takes the first rule that matches, others keep their names. An empty
  map keeps a checkpoint's keys as they are (no detection).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergebench.engine.checkpoints import TensorReader
from mergebench.engine.keymatch import (
    compile_patterns,
    examples,
    is_excluded,
    prefix_fits,
)
from mergebench.engine.renamed import CanonicalSource
from mergebench.util.errors import MergeBenchError

PRETRAINED = "pretrained"


@dataclass(frozen=True)
class Rules:
    """One checkpoint's renaming: ordered {from: to} rules and where they came from."""

    rules: dict[str, str]
    how: str  # "detected" | "strip_prefix" | "key_map"

    def record(self) -> dict[str, Any]:
        return {"rules": dict(self.rules), "how": self.how}


def align_checkpoints(
    pretrained: TensorReader,
    finetuned: Mapping[str, TensorReader],
    exclude: list[str],
    key_map: Any = None,
    strip_prefix: Any = None,
) -> tuple[TensorReader, dict[str, TensorReader], dict[str, dict[str, Any]]]:
    """The checkpoints under the pretrained model's key names, and the renaming applied
    ({checkpoint: {"rules": {from: to}, "how": ...}}, for the result's record)."""
    roles = [PRETRAINED, *finetuned]
    if PRETRAINED in finetuned and any(
        isinstance(option, Mapping) and PRETRAINED in option for option in (key_map, strip_prefix)
    ):
        raise MergeBenchError(
            "finetuned: a task named 'pretrained' cannot be told apart from the pretrained "
            "model in key_map/strip_prefix; rename the task"
        )
    explicit = _explicit_rules(key_map, strip_prefix, list(finetuned))
    sources = {PRETRAINED: pretrained, **finetuned}
    _check_rules_used(explicit, sources, key_map, finetuned)
    renamed: dict[str, TensorReader] = {}
    for role in roles:
        rules = explicit.get(role)
        renamed[role] = sources[role] if rules is None else _rename(sources[role], rules)
    pre = renamed[PRETRAINED]
    records = {r: explicit[r] for r in roles if explicit.get(r) is not None and explicit[r].rules}
    patterns = compile_patterns(exclude)
    backbone = [k for k in pre.keys() if not is_excluded(k, patterns)]
    for task in finetuned:
        if task in explicit:
            continue
        detected = _detect(pre, renamed[task], backbone)
        if detected is not None:
            renamed[task] = _rename(renamed[task], detected)
            records[task] = detected
    aligned = {t: renamed[t] for t in finetuned}
    return pre, aligned, {role: rules.record() for role, rules in records.items()}


def describe_alignment(records: Mapping[str, Mapping[str, Any]], pre_name: str) -> list[str]:
    """One progress line per distinct renaming, naming the checkpoints it applies to."""
    groups: dict[tuple[str, str], list[str]] = {}
    for role, record in records.items():
        rules = ", ".join(f"{f!r} -> {t!r}" for f, t in record["rules"].items())
        groups.setdefault((rules, record["how"]), []).append(role)
    return [
        f"key names of {', '.join(roles)} renamed {rules} ({how}); the result's keys are "
        f"named as in {pre_name}"
        for (rules, how), roles in groups.items()
    ]


def _detect(pre: TensorReader, ft: TensorReader, backbone: list[str]) -> Rules | None:
    keys = ft.keys()
    have = set(keys)
    if all(k in have for k in backbone):
        return None  # the names match already (extra keys are the key plan's to judge)
    fits = [f for f in prefix_fits(backbone, pre.keys(), keys) if f.fits]
    if len(fits) > 1:
        options = " and ".join(
            f"{f.prefix.option()} ({f.prefix.action} {f.prefix.prefix!r})" for f in fits[:2]
        )
        raise MergeBenchError(
            f"{ft.name}: its keys match {pre.name} under two prefixes, {options}; "
            "give the one you mean"
        )
    return Rules(fits[0].prefix.rules(), "detected") if fits else None


def _explicit_rules(key_map: Any, strip_prefix: Any, tasks: list[str]) -> dict[str, Rules]:
    """{checkpoint: Rules} from the two options, each checked (one line per mistake)."""
    roles = [PRETRAINED, *tasks]
    explicit: dict[str, Rules] = {}
    for role, prefix in _per_checkpoint(strip_prefix, "strip_prefix", roles, tasks).items():
        if not isinstance(prefix, str) or not prefix.strip("."):
            raise MergeBenchError(
                f"strip_prefix: expected a key prefix like 'bert.' for {role}, got {prefix!r}"
            )
        prefix = prefix if prefix.endswith(".") else prefix + "."
        explicit[role] = Rules({prefix: ""}, "strip_prefix")
    for role, rules in _per_checkpoint(key_map, "key_map", roles, tasks, nested=True).items():
        if role in explicit:
            raise MergeBenchError(f"key_map and strip_prefix both rename {role}: give one of them")
        explicit[role] = Rules(_check_map(rules, role), "key_map")
    return explicit


def _per_checkpoint(
    value: Any, option: str, roles: list[str], tasks: list[str], nested: bool = False
) -> dict[str, Any]:
    """A value for every fine-tuned model, or a mapping {checkpoint: value}."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        if nested:
            raise MergeBenchError(
                f"{option}: expected a mapping like {{'bert.': ''}} or {{task: {{'bert.': ''}}}}, "
                f"got {value!r}"
            )
        return dict.fromkeys(tasks, value)
    if nested and not any(isinstance(v, Mapping) for v in value.values()):
        return dict.fromkeys(tasks, value)  # {from: to} for every fine-tuned model
    for role, entry in value.items():
        if role not in roles:
            raise MergeBenchError(
                f"{option}: {role!r} is not a checkpoint of this merge (use pretrained or a "
                f"task: {', '.join(tasks)})"
            )
        if nested and not isinstance(entry, Mapping):
            raise MergeBenchError(
                f"{option}.{role}: expected a mapping {{from: to}}, got {entry!r} (give rules "
                "for every checkpoint, or one map for all)"
            )
    return dict(value)


def _check_map(rules: Mapping[Any, Any], role: str) -> dict[str, str]:
    checked: dict[str, str] = {}
    for source, target in rules.items():
        if not isinstance(source, str) or not isinstance(target, str):
            raise MergeBenchError(
                f"key_map ({role}): rules map a key prefix or ^regex to a string, got "
                f"{source!r}: {target!r}"
            )
        if source.startswith("^"):
            try:
                re.compile(source)
            except re.error as err:
                raise MergeBenchError(
                    f"key_map ({role}): invalid regex {source!r} ({err})"
                ) from None
        checked[source] = target
    return checked


def _apply(rules: Mapping[str, str], key: str) -> tuple[str, str | None]:
    """`key` renamed by the first matching rule, and that rule (None: no rule matched)."""
    for source, target in rules.items():
        if source.startswith("^"):
            pattern = re.compile(source)
            if pattern.match(key):
                try:
                    return pattern.sub(target, key, count=1), source
                except re.error as err:
                    raise MergeBenchError(
                        f"key_map: replacement {target!r} of {source!r} is invalid ({err})"
                    ) from None
        elif key.startswith(source):
            return target + key[len(source) :], source
    return key, None


def _rename(source: TensorReader, rules: Rules) -> TensorReader:
    if not rules.rules:
        return source
    names: dict[str, str] = {}
    for key in source.keys():
        new, _ = _apply(rules.rules, key)
        if not new:
            raise MergeBenchError(f"{rules.how}: {source.name} key {key!r} would be renamed to ''")
        if new in names:
            raise MergeBenchError(
                f"{rules.how}: {source.name} keys {names[new]!r} and {key!r} would both be "
                f"named {new!r}"
            )
        names[new] = key
    return CanonicalSource(source, names)


def _check_rules_used(
    explicit: Mapping[str, Rules],
    sources: Mapping[str, TensorReader],
    key_map: Any,
    finetuned: Mapping[str, TensorReader],
) -> None:
    """A prefix to strip that no key has, or a rule that renames nothing, is a mistake
    (a checkpoint merged unchanged would look renamed as asked)."""
    for_all = isinstance(key_map, Mapping) and not any(
        isinstance(v, Mapping) for v in key_map.values()
    )
    for role, rules in explicit.items():
        keys = sources[role].keys()
        used = {_apply(rules.rules, k)[1] for k in keys}
        for source in rules.rules:
            if source in used:
                continue
            if rules.how == "strip_prefix":
                starts = sorted({k.split(".", 1)[0] + "." for k in keys})
                raise MergeBenchError(
                    f"strip_prefix: no key of {sources[role].name} starts with {source!r} "
                    f"(its keys start with {examples(starts)}), so nothing would be stripped"
                )
            if for_all and role != PRETRAINED:
                others = [t for t in finetuned if t in explicit]
                if any(_apply(rules.rules, k)[1] == source for t in others
                       for k in sources[t].keys()):  # fmt: skip
                    continue
                where = "any fine-tuned model"
            else:
                where = str(sources[role].name)
            raise MergeBenchError(
                f"key_map: rule {source!r} -> {rules.rules[source]!r} matches no key of {where} "
                f"(first keys: {examples(sorted(keys))})"
            )
