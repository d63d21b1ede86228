"""The middleware contract for middleware authors, and what the built-ins share.

The chain itself (``async def mw(ctx, next)``, :class:`Observer`, :class:`SkipEvent`,
:class:`DeadLetterEvent`, how a rule's chain is composed) is the engine's: :mod:`krules.chain`,
re-exported here so middleware import their whole contract from one place.

What the built-ins share: the outcome of a handler call (:func:`outcome_of`), which the logging,
metrics, tracing, circuit-breaker and dead-letter middleware all read from the error the rest of
the chain raised, and the checking of listener options (:func:`check_listeners`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, TypeGuard

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
    "CANCELLED",
    "DEAD_LETTERED",
    "FAILED",
    "OK",
    "SKIPPED",
    "Call",
    "DeadLetterEvent",
    "FailureHandler",
    "Middleware",
    "Next",
    "Observer",
    "Outcome",
    "SkipEvent",
    "applies",
    "build_chain",
    "check_listeners",
    "is_failure",
    "mark_handler",
    "outcome_of",
]

Outcome = Literal["ok", "skipped", "dead_lettered", "failed", "cancelled"]
"""How a handler call ended, as the built-ins log, count and record it."""
OK: Final = "ok"
"""The call returned."""
SKIPPED: Final = "skipped"
"""It raised :class:`SkipEvent`: ended on purpose, not a failure."""
DEAD_LETTERED: Final = "dead_lettered"
"""It raised :class:`DeadLetterEvent` (an open circuit, a known-bad event): a failure, never retried."""
FAILED: Final = "failed"
"""It raised any other exception (a storage failure, too: :func:`krules.errors.aborts_turn` tells it
apart where that matters)."""
CANCELLED: Final = "cancelled"
"""It was cancelled (shutdown, a time-out around it) or interrupted: not the handler's doing, and no
outcome of its own (logging and metrics leave it out)."""


def outcome_of(error: BaseException | None) -> Outcome:
    """The outcome of a handler call that raised ``error`` (None: it returned).

    A :class:`SkipEvent` that is also a :class:`DeadLetterEvent` is skipped.
    """
    if error is None:
        return OK
    if isinstance(error, SkipEvent):
        return SKIPPED
    if isinstance(error, DeadLetterEvent):
        return DEAD_LETTERED
    if isinstance(error, Exception):
        return FAILED
    return CANCELLED


def is_failure(error: BaseException | None) -> TypeGuard[Exception]:
    """Whether a call that raised ``error`` failed: its outcome is :data:`FAILED` or
    :data:`DEAD_LETTERED` (what the dead-letter middleware stores and a span records as an error)."""
    outcome = outcome_of(error)
    return outcome in (FAILED, DEAD_LETTERED)


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
