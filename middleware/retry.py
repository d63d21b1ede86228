"""Retry: call a handler again, with exponential backoff and jitter, for the errors its rule declares.

A rule opts in with the :func:`retry` decorator, written above or below ``@on`` (``@on`` returns the
function unchanged, and the middleware reads the mark from ``ctx.rule.handler`` at call time)::

    @on("weather.requested")
    @retry(on=(ConnectionError, TimeoutError), attempts=4, backoff=0.5, cap=8.0)
    async def fetch(ctx):
        ...

Handlers without the mark are called once.  For a marked handler, attempt ``n`` that fails with a
listed exception is followed, after a pause, by attempt ``n + 1``, up to ``attempts`` calls in all.
The pause before attempt ``n + 1`` is ``min(cap, backoff * 2 ** (n - 1))`` seconds, with **full
jitter** by default (a uniform draw between 0 and that bound, which spreads the retries of many
failing calls best), or **equal jitter** with ``jitter="equal"`` (half the bound plus a uniform draw
over the other half: never shorter than half), or none with ``jitter=False``.  It is slept with
``await ctx.clock.sleep(...)``, so tests on a fake clock never wait.

Only the listed exceptions are retried: any other exception, :class:`~middleware.base.SkipEvent` and
:class:`~middleware.base.DeadLetterEvent` (e.g. an open circuit) pass through at once.  When the
attempts are spent, the last exception is re-raised unchanged.

Before each attempt the middleware records the attempt number under
:data:`~middleware.base.ATTEMPTS` (``ctx.get_metadata(ATTEMPTS)`` is 1 on the first call), so the
handler knows it is being retried and outer middleware (metrics, dead letters) see how many attempts
were made; the key stays unset for handlers that are not marked (one attempt).  Each attempt is a
fresh call of the handler that re-emits the same event ids as the first (see ``middleware.base``), so
consumers can deduplicate.  Writes to subjects made by a failed attempt stay in the turn's cache.

Order the chain so that the retry wraps the time limit (``[RetryMiddleware(), TimeoutMiddleware()]``):
each attempt then gets the full limit, and a timed-out attempt is retried when the rule lists
``TimeoutError``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from random import Random
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from krules.config import EnvSettings, integer, number, setting
from krules.errors import ConfigurationError, RuleDefinitionError
from middleware.base import ATTEMPTS, DeadLetterEvent, Next, SkipEvent, mark_handler

if TYPE_CHECKING:
    from krules.context import EventContext
    from krules.rules import Rule
    from middleware.registry import ChainBuild

__all__ = [
    "RETRY_POLICY",
    "Jitter",
    "RetryMiddleware",
    "RetryPolicy",
    "RetrySettings",
    "from_settings",
    "retry",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
Jitter = Literal["full", "equal"] | None
"""The jitter of a :class:`RetryPolicy`: full, equal, or None for exact pauses."""

RETRY_POLICY: Final = "_krules_retry"
"""Name of the handler attribute holding its :class:`RetryPolicy` (set by :func:`retry`)."""

_NEVER_RETRIED: Final = (SkipEvent, DeadLetterEvent)
_MAX_EXPONENT: Final = 64  # 2**64 times any backoff is past every cap; keeps the float finite


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one rule is retried: the exceptions, the total attempts, the backoff and the jitter.

    ``backoff`` and ``cap`` are None when the rule leaves them to the middleware's defaults.
    """

    on: tuple[type[Exception], ...]
    attempts: int
    backoff: float | None
    cap: float | None
    jitter: Jitter


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _rule_error(option: str, value: object, expected: str) -> RuleDefinitionError:
    hint = " (write the decorator with parentheses)" if callable(value) and option == "on" else ""
    return RuleDefinitionError(f"@retry got {option}={value!r}{hint}; pass {expected}.")


def _check_on(on: object) -> tuple[type[Exception], ...]:
    expected = "an exception class or a tuple of them, e.g. on=(ConnectionError, TimeoutError)"
    types = on if isinstance(on, tuple) else (on,)
    if not types:
        raise _rule_error("on", on, expected)
    for exc_type in types:
        if not isinstance(exc_type, type) or not issubclass(exc_type, Exception):
            raise _rule_error("on", on, expected)
        if issubclass(exc_type, _NEVER_RETRIED):
            raise RuleDefinitionError(
                f"@retry got on={on!r}, but {exc_type.__name__} is never retried (it skips or "
                "dead-letters the event on purpose); list only the errors worth another attempt."
            )
    return types


def _check_jitter(jitter: object, error: Callable[[str, object, str], Exception]) -> Jitter:
    if jitter is True or jitter == "full":
        return "full"
    if jitter == "equal":
        return "equal"
    if jitter is False or jitter is None:
        return None
    raise error("jitter", jitter, 'True or "full" (full jitter), "equal" (equal jitter) or False (none)')


def retry(
    on: type[Exception] | tuple[type[Exception], ...],
    *,
    attempts: int = 5,
    backoff: float | None = None,
    cap: float | None = None,
    jitter: bool | Literal["full", "equal"] = True,
) -> Callable[[F], F]:
    """Decorator: retry the rule's handler on the exceptions ``on``, up to ``attempts`` calls in all.

    ``backoff`` is the pause in seconds before the first retry (doubling each time, up to ``cap``);
    left as None they take the middleware's ``default_backoff`` (0.1 s) and ``default_cap`` (10 s).
    ``jitter`` is full jitter when True, ``"equal"`` for equal jitter, False for exact pauses.
    Invalid arguments raise :class:`~krules.errors.RuleDefinitionError` at decoration time.
    """
    types = _check_on(on)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise _rule_error("attempts", attempts, "the total number of calls, an integer of at least 1")
    if backoff is not None and (not _is_number(backoff) or backoff < 0):
        raise _rule_error("backoff", backoff, "the first pause in seconds, a number of at least 0")
    if cap is not None and (not _is_number(cap) or cap < 0):
        raise _rule_error("cap", cap, "the longest pause in seconds, a number of at least 0")
    if backoff is not None and cap is not None and cap < backoff:
        raise RuleDefinitionError(
            f"@retry got cap={cap!r} below backoff={backoff!r}; the cap bounds the growing pause, "
            "so make it at least the first one."
        )
    policy = RetryPolicy(
        types,
        attempts,
        None if backoff is None else float(backoff),
        None if cap is None else float(cap),
        _check_jitter(jitter, _rule_error),
    )

    def decorator(handler: F) -> F:
        return mark_handler(handler, RETRY_POLICY, policy, "retry")

    return decorator


def _config_error(option: str, value: object, expected: str) -> ConfigurationError:
    return ConfigurationError(f"RetryMiddleware got {option}={value!r}; pass {expected}.")


class RetryMiddleware:
    """Middleware: retries handlers marked with :func:`retry` (unmarked handlers are called once).

    ``max_attempts_cap`` bounds the attempts any rule may ask for (None: no bound);
    ``default_backoff`` and ``default_cap`` apply to rules that do not set ``backoff``/``cap``;
    ``random`` is a :class:`random.Random` or a function returning a float in [0, 1), to make the
    jitter deterministic in tests.
    """

    __slots__ = ("_cap", "_default_backoff", "_default_cap", "_random")

    def __init__(
        self,
        *,
        max_attempts_cap: int | None = None,
        default_backoff: float = 0.1,
        default_cap: float = 10.0,
        random: Random | Callable[[], float] | None = None,
    ) -> None:
        if max_attempts_cap is not None and (
            not isinstance(max_attempts_cap, int)
            or isinstance(max_attempts_cap, bool)
            or max_attempts_cap < 1
        ):
            raise _config_error("max_attempts_cap", max_attempts_cap, "an integer of at least 1, or None")
        if not _is_number(default_backoff) or default_backoff < 0:
            raise _config_error("default_backoff", default_backoff, "a number of seconds of at least 0")
        if not _is_number(default_cap) or default_cap < 0:
            raise _config_error("default_cap", default_cap, "a number of seconds of at least 0")
        if random is None:
            draw: Callable[[], float] = Random().random
        elif isinstance(random, Random):
            draw = random.random
        elif callable(random):
            draw = random
        else:
            raise _config_error("random", random, "a random.Random or a function returning a float in [0, 1)")
        self._cap = max_attempts_cap
        self._default_backoff = float(default_backoff)
        self._default_cap = float(default_cap)
        self._random = draw

    def applies_to(self, rule: Rule) -> bool:
        """Only rules marked with :func:`retry` have this middleware in their chain."""
        return getattr(rule.handler, RETRY_POLICY, None) is not None

    async def __call__(self, ctx: EventContext, next: Next) -> None:
        """Call the handler; if it is marked and fails with a listed error, back off and call again."""
        policy: RetryPolicy | None = getattr(ctx.rule.handler, RETRY_POLICY, None)
        if policy is None:
            await next()
            return
        attempts = policy.attempts if self._cap is None else min(policy.attempts, self._cap)
        retryable = policy.on
        attempt = 1
        while True:
            ctx.set_metadata(ATTEMPTS, attempt)
            try:
                await next()
                return
            except _NEVER_RETRIED:
                raise
            except retryable as exc:
                if attempt >= attempts:
                    raise
                delay = self.delay(policy, attempt)
                logger.warning(
                    "retrying %s on %s for subject %r (event %s) in %.3fs: attempt %d of %d failed: %s: %s",
                    ctx.handler_name,
                    ctx.event_type,
                    ctx.subject.name,
                    ctx.event_id,
                    delay,
                    attempt,
                    attempts,
                    type(exc).__name__,
                    exc,
                )
            await ctx.clock.sleep(delay)
            attempt += 1

    def delay(self, policy: RetryPolicy, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) of a rule with ``policy``."""
        backoff = self._default_backoff if policy.backoff is None else policy.backoff
        cap = self._default_cap if policy.cap is None else policy.cap
        bound = min(cap, backoff * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
        if policy.jitter is None:
            return bound
        if policy.jitter == "full":
            return bound * self._random()
        half = bound / 2
        return half + half * self._random()


@dataclass(frozen=True, slots=True)
class RetrySettings(EnvSettings):
    """``KRULES_RETRY_*``: the retry middleware ``krules run`` installs."""

    retry_max_attempts: int = setting(10, integer(1, 1000))
    retry_backoff: float = setting(0.1, number(0.0))
    retry_cap: float = setting(10.0, number(0.0))


def from_settings(build: ChainBuild) -> RetryMiddleware:
    """The retry middleware ``krules run`` installs: ``KRULES_RETRY_MAX_ATTEMPTS`` caps what a rule
    asks for, ``KRULES_RETRY_BACKOFF`` and ``KRULES_RETRY_CAP`` are the defaults of a mark."""
    own = RetrySettings.from_env(build.env)
    return RetryMiddleware(
        max_attempts_cap=own.retry_max_attempts,
        default_backoff=own.retry_backoff,
        default_cap=own.retry_cap,
    )
