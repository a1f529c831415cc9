"""A method whose results changed (DARE's draws, version 2) gets new run hashes, directly or
as a base method; every other run's identity is unchanged (no key added)."""

from __future__ import annotations

from mergebench.bench.job import method_versions
from mergebench.methods.registry import method_class


def test_only_changed_methods_enter_the_identity():
    assert method_class("dare").version == 2
    assert method_versions("dare", {"base": "ties"}) == {"method_versions": {"dare": 2}}
    assert method_versions("mask_rescale", {"base": "dare"}) == {"method_versions": {"dare": 2}}
    assert method_versions("ties", {"k": 0.2}) == {}
    assert method_versions("mask_rescale", {"base": "task_arithmetic"}) == {}
