"""The middleware contract for middleware authors, and what the built-ins share.

The chain itself (``async def mw(ctx, next)``, :class:`Observer`, :class:`SkipEvent`,
:class:`DeadLetterEvent`, how a rule's chain is composed) is the engine's: :mod:`krules.chain`,
re-exported here so middleware import their whole contract from one place.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from krules.chain import (
    ATTEMPTS,
    Call,
    DeadLetterEvent,
    FailureHandler,
    Middleware,
    Next,
    Observer,
    SkipEvent,
    applies,
    build_chain,
    mark_handler,
)
from krules.errors import ConfigurationError

__all__ = [
    "ATTEMPTS",
    "Call",
    "DeadLetterEvent",
    "FailureHandler",
    "Middleware",
    "Next",
    "Observer",
    "SkipEvent",
    "applies",
    "build_chain",
    "check_listeners",
    "default_middleware",
    "mark_handler",
]


def check_listeners(value: object, *, owner: str, option: str, shape: str) -> list[Callable[..., Any]]:
    """``value`` as a list of listeners: None, one plain callable, or a list/tuple of them (never
    ``async``: they are called on the hot path); ConfigurationError naming ``owner`` and ``option``."""
    candidates: Sequence[object]
    if value is None:
        candidates = []
    elif isinstance(value, list | tuple):
        candidates = value
    else:
        candidates = [value]
    checked: list[Callable[..., Any]] = []
    for listener in candidates:
        if not callable(listener) or inspect.iscoroutinefunction(listener):
            raise ConfigurationError(f"{owner} got {option}={value!r}; pass {shape}.")
        checked.append(listener)
    return checked


def default_middleware() -> list[Middleware]:
    """The middleware ``krules run`` installs by default (the built-ins arrive in their own modules)."""
    return []
