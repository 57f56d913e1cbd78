"""Resolving user factories given as 'module:function' strings."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def load_factory(ref: str, *, what: str, builtin: list[str]) -> Callable[..., Any]:
    """Import `module:function`, with an error that says what to write instead."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"unknown {what} {ref!r}: use one of {', '.join(builtin)} "
            f"or an importable factory written as 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"{what} factory {ref!r}: cannot import module {module_name!r} ({e}); "
            "is it installed in the trainer image or on PYTHONPATH?"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{what} factory {ref!r}: {module_name} has no callable {attr!r}")
    return factory
