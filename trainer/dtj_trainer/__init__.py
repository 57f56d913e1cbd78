"""The gossip trainer: what each worker pod runs, and a library for the user's own loop.

Import-light on purpose: `dtj_trainer.config` is pure pydantic and is shared
with the operator, so nothing here imports torch at package import time; the
public API (`init`, `Job`, `WrappedOptimizer`, from `dtj_trainer.api`) loads on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Job, WrappedOptimizer, init

__all__ = ["Job", "WrappedOptimizer", "init"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dtj_trainer' has no attribute {name!r}")
