"""The evaluator's data protocol: both labeled accessors offer exactly its signatures.

Commit 006f9ef once added an argument to the evaluator's call that only one accessor
accepted, which broke the paper families; this test fails on such a drift."""

from __future__ import annotations

import inspect

import pytest

from mergebench.evaluation import EvalData
from mergebench.families.labeled import HFLabeledData, LabeledData

METHODS = ["num_classes", "num_examples", "metric", "metric_name", "indexed_batches"]


def _params(fn) -> list[tuple[str, object]]:
    return [
        (p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"
    ]


@pytest.mark.parametrize("accessor", [LabeledData, HFLabeledData])
@pytest.mark.parametrize("method", METHODS)
def test_accessors_match_the_protocol(accessor, method):
    assert _params(getattr(accessor, method)) == _params(getattr(EvalData, method))


@pytest.mark.parametrize("accessor", [LabeledData, HFLabeledData])
def test_accessors_have_tasks(accessor):
    assert isinstance(inspect.getattr_static(accessor, "tasks"), property)
