"""Quantization methods: one handler per config type (registry.Method). Importing this package
registers every built-in method, so `handler_for` always sees all of them."""

from __future__ import annotations

from anyquant.config import MethodConfig, config_class
from anyquant.methods import awq, bnb, gptq, hqq, rtn  # noqa: F401  (each registers its handler)
from anyquant.methods.registry import Method, register, registered_handler

__all__ = ["Method", "handler_for", "register"]


def handler_for(method: str | MethodConfig) -> Method:
    """The handler of a method name or config; an unknown name's error lists the known ones."""
    cls = type(method) if isinstance(method, MethodConfig) else config_class(method)
    return registered_handler(cls)
