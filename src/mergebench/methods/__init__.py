"""Merging methods: one module each, a functional core and a thin class."""

from mergebench.methods.base import Method
from mergebench.methods.registry import METHODS, build_method, method_defaults

__all__ = ["METHODS", "Method", "build_method", "method_defaults"]
