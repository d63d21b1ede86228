"""Timeout: a time limit on each handler call.

A rule sets its own limit with the :func:`timeout` decorator, written above or below ``@on`` (the
middleware reads the mark from ``ctx.rule.handler`` at call time)::

    @on("report.requested")
    @timeout(2.5)
    async def build_report(ctx):
        ...

Rules without the mark get the middleware's ``default`` limit (None: no limit).  The limit is real
time, enforced with :func:`asyncio.timeout` (the engine's clock only times back-offs).  A call that
runs past it is cancelled and fails with :class:`HandlerTimeoutError`: a failure like any other error,
recorded on the turn and dead-lettered by the dead-letter middleware.

:class:`HandlerTimeoutError` is both a :class:`TimeoutError` and a :class:`~krules.errors.KRulesError`,
so ``@retry(on=(TimeoutError,))`` retries timed-out calls and ``except KRulesError`` still catches it.
Put the retry middleware outside this one (registered first) so that each attempt gets the full limit;
the other way round, the limit would bound all attempts and their back-offs together.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from krules.config import EnvSettings, optional_seconds, setting
from krules.errors import ConfigurationError, KRulesError, RuleDefinitionError
from middleware.base import Next, mark_handler

if TYPE_CHECKING:
    from krules.context import EventContext
    from krules.rules import Rule
    from middleware.registry import ChainBuild

__all__ = [
    "TIME_LIMIT",
    "HandlerTimeoutError",
    "TimeoutMiddleware",
    "TimeoutSettings",
    "from_settings",
    "timeout",
]

F = TypeVar("F", bound=Callable[..., Any])

TIME_LIMIT: Final = "_krules_timeout"
"""Name of the handler attribute holding its time limit in seconds (set by :func:`timeout`)."""


class HandlerTimeoutError(TimeoutError, KRulesError):
    """Raised when a handler call runs past its time limit (it was cancelled).

    ``handler`` is the handler's dotted name and ``seconds`` the limit it ran past.
    """

    def __init__(self, handler: str, seconds: float) -> None:
        super().__init__(
            f"Handler {handler!r} did not finish within its time limit of {seconds:g}s and was cancelled; "
            "make it faster or give it more time with @timeout(seconds)."
        )
        self.handler = handler
        self.seconds = seconds

    def __reduce__(self) -> tuple[type[HandlerTimeoutError], tuple[str, float]]:
        # rebuilt from its own arguments (copy, and anything else that reduces exceptions)
        return type(self), (self.handler, self.seconds)


def _valid_seconds(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def timeout(seconds: float) -> Callable[[F], F]:
    """Decorator: limit each call of the rule's handler to ``seconds`` (a positive number).

    An invalid limit raises :class:`~krules.errors.RuleDefinitionError` at decoration time.
    """
    if not _valid_seconds(seconds):
        hint = " (write the decorator with its limit, e.g. @timeout(2.5))" if callable(seconds) else ""
        raise RuleDefinitionError(
            f"@timeout got seconds={seconds!r}{hint}; pass the time limit as a positive number of seconds."
        )
    limit = float(seconds)

    def decorator(handler: F) -> F:
        return mark_handler(handler, TIME_LIMIT, limit, "timeout")

    return decorator


class TimeoutMiddleware:
    """Middleware: cancels a handler call that runs past its limit and raises HandlerTimeoutError.

    The limit is the rule's own (:func:`timeout`), else ``default`` seconds; None means no limit.
    """

    __slots__ = ("_default",)

    def __init__(self, *, default: float | None = None) -> None:
        if default is not None and not _valid_seconds(default):
            raise ConfigurationError(
                f"TimeoutMiddleware got default={default!r}; pass a positive number of seconds, "
                "or None for no limit on rules without @timeout."
            )
        self._default = None if default is None else float(default)

    @property
    def default(self) -> float | None:
        """The limit in seconds for rules without :func:`timeout` (None: none)."""
        return self._default

    def applies_to(self, rule: Rule) -> bool:
        """Only rules with a time limit (their own, or the default) have this middleware in their chain."""
        return getattr(rule.handler, TIME_LIMIT, self._default) is not None

    async def __call__(self, ctx: EventContext, next: Next) -> None:
        """Run the rest of the chain within the rule's time limit."""
        limit: float | None = getattr(ctx.rule.handler, TIME_LIMIT, self._default)
        if limit is None:
            await next()
            return
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                await next()
        except TimeoutError as exc:
            if deadline.expired():  # ours, not a TimeoutError the handler raised itself
                # chained: the cause's traceback shows where the handler was when it was cancelled
                raise HandlerTimeoutError(ctx.handler_name, limit) from exc
            raise


@dataclass(frozen=True, slots=True)
class TimeoutSettings(EnvSettings):
    """``KRULES_HANDLER_TIMEOUT``: the limit of rules without ``@timeout`` (none by default)."""

    handler_timeout: float | None = setting(None, optional_seconds)


def from_settings(build: ChainBuild) -> TimeoutMiddleware:
    """The time-out middleware ``krules run`` installs, limiting unmarked rules to
    ``KRULES_HANDLER_TIMEOUT``."""
    return TimeoutMiddleware(default=TimeoutSettings.from_env(build.env).handler_timeout)
