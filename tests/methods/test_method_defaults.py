"""Every method default in conf/method/*.yaml is the one docs/methods.md names, and every
option a yaml gives a default is one its method class declares (and the other way round).

The contract's tables have a `parameters (default)` column of `name (default)` items, e.g.
"`k` keep fraction (0.2), `aggregate` `mean`/`sum` (`sum`)". Names without a default of their
own share the next one ("`elect`, `mask`, `rescale` (all true)"); "`rescaler` as emr" takes
emr's. Every option of every method's yaml must be in its table row, with the same default,
and every option of the row must be in the yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from mergebench.methods.registry import method_class
from mergebench.util.config import conf_dir

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"
METHOD_CONF = conf_dir() / "method"
PARAMETERS = "parameters (default)"
# Keys of a method's yaml that are not method options: its name, and the benchmark's
# validation grid (`search`, which build_method drops).
NOT_OPTIONS = ("search",)
# Prose defaults that mean "null" in the yaml (the value comes from elsewhere).
NULL_PROSE = ("null", "from the family")


def split_outside_backticks(text: str, separators: str) -> list[str]:
    """Split at the separator characters outside backticks, parentheses and brackets."""
    parts, current, quoted, depth = [], "", False, 0
    for ch in text:
        if ch == "`":
            quoted = not quoted
        elif not quoted and ch in "([":
            depth += 1
        elif not quoted and ch in ")]":
            depth -= 1
        if ch in separators and not quoted and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts]


def first_parenthesised(item: str) -> str | None:
    """The text of the first (...) group outside backticks, or None."""
    quoted, start, depth = False, None, 0
    for i, ch in enumerate(item):
        if ch == "`":
            quoted = not quoted
        elif not quoted and ch == "(":
            if depth == 0:
                start = i + 1
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
            if depth == 0:
                return item[start:i]
    return None


def parse_value(text: str, where: str) -> Any:
    """A documented default as the yaml would hold it."""
    # "0.6, or a per-task mapping", "`global`; `++` only", "null: the whole test split"
    head = re.split(r"[;,:]", split_outside_backticks(text, ";")[0])[0].strip()
    head = head.removeprefix("all ").strip()
    if head.startswith("`") and head.endswith("`"):
        return head[1:-1]
    if head in ("true", "false"):
        return head == "true"
    if head in NULL_PROSE:
        return None
    try:
        return int(head)
    except ValueError:
        pass
    try:
        return float(head)
    except ValueError:
        raise AssertionError(f"{where}: cannot read the default {text!r}") from None


def parse_cell(method: str, cell: str) -> dict[str, Any]:
    """`name (default)` items of one table cell -> {name: default or ('as', method)}."""
    defaults: dict[str, Any] = {}
    pending: list[str] = []
    for item in split_outside_backticks(cell, ","):
        match = re.match(r"`([A-Za-z_][A-Za-z0-9_]*)`", item)
        if match is None:
            continue  # prose such as "—"
        name = match.group(1)
        inside = first_parenthesised(item[match.end() :])
        alias = re.search(r"\bas (\w+)\s*$", item)
        if inside is not None:
            value = parse_value(inside, f"{method}.{name}")
            for earlier in pending:
                defaults[earlier] = value
            pending = []
            defaults[name] = value
        elif alias is not None:
            defaults[name] = ("as", alias.group(1))
        else:
            pending.append(name)
    for name in pending:
        raise AssertionError(f"docs/methods.md: {method}.{name} is listed without a default")
    return defaults


def documented_defaults(text: str) -> dict[str, dict[str, Any]]:
    """{method: {option: default}} from every table with a `parameters (default)` column."""
    out: dict[str, dict[str, Any]] = {}
    column = None
    for line in text.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if column is None:
            column = cells.index(PARAMETERS) if PARAMETERS in cells else -1
            continue
        if column < 0 or set(cells[0]) <= set("-: "):
            continue
        name = re.fullmatch(r"`(\w+)`", cells[0])
        assert name is not None, f"docs/methods.md: table row {cells[0]!r} is not a method name"
        out[name.group(1)] = parse_cell(name.group(1), cells[column])
    for options in out.values():
        for option, value in options.items():
            if isinstance(value, tuple):
                options[option] = out[value[1]][option]
    return out


DOCUMENTED = documented_defaults(DOC.read_text(encoding="utf-8"))
YAMLS = sorted(METHOD_CONF.glob("*.yaml"))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b


def test_the_parser_reads_the_contract_forms():
    cell = (
        "`k` keep fraction (0.2), `aggregate` `mean`/`sum` (`sum`), `elect`, `mask` (all true), "
        "`threshold` (0.6, or a per-task mapping), `lr` (1e-3), `keys` (`.*\\.weight`), "
        "`layer_pattern` (from the family), `n` (null: all), `ties_k` (0.2; `++` only), "
        "`clamp` [0,1] (true)"
    )
    assert parse_cell("m", cell) == {
        "k": 0.2,
        "aggregate": "sum",
        "elect": True,
        "mask": True,
        "threshold": 0.6,
        "lr": 1e-3,
        "keys": ".*\\.weight",
        "layer_pattern": None,
        "n": None,
        "ties_k": 0.2,
        "clamp": True,
    }
    with pytest.raises(AssertionError, match=r"m\.batch_size is listed without a default"):
        parse_cell("m", "`alpha` (0.9), `batch_size`")


def test_every_method_conf_is_documented():
    assert len(YAMLS) >= 9
    missing = [p.stem for p in YAMLS if p.stem not in DOCUMENTED]
    assert not missing, f"conf/method/{missing[0]}.yaml has no row in docs/methods.md"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_conf_defaults_match_docs_methods_md(path):
    conf = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert conf.pop("name") == path.stem, f"{path.name}: name is not {path.stem!r}"
    for key in NOT_OPTIONS:
        conf.pop(key, None)
    documented = DOCUMENTED.get(path.stem)
    assert documented is not None, f"{path.name}: no row `{path.stem}` in docs/methods.md"
    for option, value in conf.items():
        assert option in documented, (
            f"conf/method/{path.name} option {option!r} (default {value!r}) is missing from "
            f"the `{path.stem}` row of docs/methods.md"
        )
        assert same(value, documented[option]), (
            f"conf/method/{path.name}: {option} = {value!r}, but docs/methods.md says "
            f"{path.stem}.{option} defaults to {documented[option]!r}"
        )
    for option in documented:
        assert option in conf, (
            f"docs/methods.md documents {path.stem}.{option} (default {documented[option]!r}), "
            f"but conf/method/{path.name} has no such option"
        )


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_conf_options_are_the_declared_options(path):
    conf = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    conf.pop("name")
    for key in NOT_OPTIONS:
        conf.pop(key, None)
    declared = method_class(path.stem).options
    for option in conf:
        assert option in declared, (
            f"conf/method/{path.name} gives a default for {option!r}, which "
            f"mergebench.methods.{path.stem} does not declare"
        )
    for option in declared:
        assert option in conf, (
            f"mergebench.methods.{path.stem} declares {option!r}, but conf/method/{path.name} "
            "gives it no default"
        )
