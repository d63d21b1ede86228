"""Retry middleware: which errors are retried, how long it backs off, and what the attempts record."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from random import Random
from typing import Any

import pytest

from krules.context import EventContext
from krules.errors import ConfigurationError, RuleDefinitionError
from krules.testing import KRulesTestApp
from middleware.base import ATTEMPTS, DeadLetterEvent, Next, SkipEvent
from middleware.retry import RetryMiddleware, retry


def fixed_draws(*values: float) -> Callable[[], float]:
    """A ``random`` for the middleware that returns ``values`` in turn."""
    draws: Iterator[float] = iter(values)
    return lambda: next(draws)


def failing(times: int, error: Callable[[], Exception]) -> tuple[list[int], Callable[[EventContext], Any]]:
    """A handler body that raises ``error()`` on its first ``times`` calls and records each attempt."""
    seen: list[int] = []

    async def body(ctx: EventContext) -> None:
        seen.append(ctx.get_metadata(ATTEMPTS))
        if len(seen) <= times:
            raise error()

    return seen, body


async def test_a_marked_handler_is_retried_until_it_succeeds_and_sees_each_attempt_number(
    krules_app: KRulesTestApp,
) -> None:
    krules_app.middleware(RetryMiddleware())
    seen, body = failing(2, lambda: ConnectionError("api down"))

    @krules_app.on("fetch")
    @retry(on=ConnectionError, attempts=5, backoff=0.1, jitter=False)
    async def fetch(ctx: EventContext) -> None:
        await body(ctx)

    await krules_app.emit("fetch", "s")
    assert seen == [1, 2, 3]
    assert krules_app.clock.sleeps == pytest.approx([0.1, 0.2])
    assert krules_app.recorder.failures == []


async def test_the_backoff_doubles_after_each_failure_up_to_the_cap(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(RetryMiddleware())
    seen, body = failing(10, lambda: TimeoutError("slow api"))

    @krules_app.on("fetch")
    @retry(on=(ConnectionError, TimeoutError), attempts=6, backoff=1.0, cap=5.0, jitter=False)
    async def fetch(ctx: EventContext) -> None:
        await body(ctx)

    await krules_app.emit("fetch", "s")
    assert seen == [1, 2, 3, 4, 5, 6]
    assert krules_app.clock.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]


async def test_spent_attempts_re_raise_the_last_exception_unchanged_and_record_the_count(
    krules_app: KRulesTestApp,
) -> None:
    recorded: list[Any] = []

    @krules_app.middleware
    async def outer(ctx: EventContext, next: Next) -> None:
        try:
            await next()
        finally:
            recorded.append(ctx.get_metadata(ATTEMPTS))

    krules_app.middleware(RetryMiddleware())
    raised: list[ConnectionError] = []

    @krules_app.on("fetch")
    @retry(on=ConnectionError, attempts=3, jitter=False)
    async def fetch(ctx: EventContext) -> None:
        raised.append(ConnectionError(f"attempt {len(raised) + 1} failed"))
        raise raised[-1]

    await krules_app.emit("fetch", "s")
    (failure,) = krules_app.recorder.failures
    assert failure.error is raised[-1]
    assert str(failure.error) == "attempt 3 failed"
    assert recorded == [3]
    assert len(krules_app.clock.sleeps) == 2


async def test_errors_not_declared_retryable_fail_at_once(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(RetryMiddleware())
    seen, body = failing(1, lambda: ValueError("bad payload"))

    @krules_app.on("fetch")
    @retry(on=ConnectionError)
    async def fetch(ctx: EventContext) -> None:
        await body(ctx)

    await krules_app.emit("fetch", "s")
    assert seen == [1]
    assert krules_app.clock.sleeps == []
    assert [type(f.error) for f in krules_app.recorder.failures] == [ValueError]


@pytest.mark.parametrize(
    "control", [SkipEvent(), DeadLetterEvent("Unknown order type.", "rejected")], ids=["skip", "dead_letter"]
)
async def test_skip_and_dead_letter_pass_through_even_when_every_exception_is_retryable(
    krules_app: KRulesTestApp, control: Exception
) -> None:
    krules_app.middleware(RetryMiddleware())
    calls: list[int] = []

    @krules_app.on("fetch")
    @retry(on=Exception)
    async def fetch(ctx: EventContext) -> None:
        calls.append(ctx.get_metadata(ATTEMPTS))
        raise control

    await krules_app.emit("fetch", "s")
    assert calls == [1]
    assert krules_app.clock.sleeps == []
    expected = [] if isinstance(control, SkipEvent) else [control]
    assert [f.error for f in krules_app.recorder.failures] == expected


async def test_unmarked_handlers_are_called_once_and_record_no_attempts(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(RetryMiddleware())
    seen, body = failing(1, lambda: ConnectionError("api down"))

    @krules_app.on("fetch")
    async def fetch(ctx: EventContext) -> None:
        await body(ctx)

    await krules_app.emit("fetch", "s")
    assert seen == [None]
    assert [type(f.error) for f in krules_app.recorder.failures] == [ConnectionError]


async def test_a_retried_handler_re_emits_the_same_event_ids(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(RetryMiddleware())

    @krules_app.on("order.submitted")
    @retry(on=ConnectionError, attempts=3, jitter=False)
    async def charge(ctx: EventContext) -> None:
        await ctx.emit("payment.requested")
        await ctx.emit("payment.audit")
        if ctx.get_metadata(ATTEMPTS) < 3:
            raise ConnectionError("gateway down after emitting")

    await krules_app.emit("order.submitted", "order-1")
    requested = [e.id for e in krules_app.recorder.of_type("payment.requested")]
    audited = [e.id for e in krules_app.recorder.of_type("payment.audit")]
    assert len(requested) == 3 and len(set(requested)) == 1
    assert len(audited) == 3 and len(set(audited)) == 1
    assert requested[0] != audited[0]
    assert krules_app.recorder.failures == []


async def test_full_jitter_draws_each_pause_between_zero_and_the_backoff(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(RetryMiddleware(random=fixed_draws(0.5, 0.25, 1.0)))
    _, body = failing(3, lambda: ConnectionError("api down"))

    @krules_app.on("fetch")
    @retry(on=ConnectionError, backoff=1.0, cap=10.0)
    async def fetch(ctx: EventContext) -> None:
        await body(ctx)

    await krules_app.emit("fetch", "s")
    assert krules_app.clock.sleeps == [0.5 * 1.0, 0.25 * 2.0, 1.0 * 4.0]


async def test_equal_jitter_never_pauses_less_than_half_the_backoff(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(RetryMiddleware(random=fixed_draws(0.0, 0.5)))
    _, body = failing(2, lambda: ConnectionError("api down"))

    @krules_app.on("fetch")
    @retry(on=ConnectionError, backoff=1.0, jitter="equal")
    async def fetch(ctx: EventContext) -> None:
        await body(ctx)

    await krules_app.emit("fetch", "s")
    assert krules_app.clock.sleeps == [0.5, 1.0 + 0.5]


async def test_a_seeded_random_makes_the_jitter_repeatable() -> None:
    async def run() -> list[float]:
        async with KRulesTestApp() as app:
            app.middleware(RetryMiddleware(random=Random(42)))
            _, body = failing(4, lambda: ConnectionError("api down"))

            @app.on("fetch")
            @retry(on=ConnectionError, backoff=1.0)
            async def fetch(ctx: EventContext) -> None:
                await body(ctx)

            await app.emit("fetch", "s")
            return app.clock.sleeps

    first = await run()
    assert first == await run()
    assert [0 <= pause <= 2**n for n, pause in enumerate(first)] == [True] * 4


async def test_max_attempts_cap_bounds_what_a_rule_asks_for(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(RetryMiddleware(max_attempts_cap=2))
    seen, body = failing(10, lambda: ConnectionError("api down"))

    @krules_app.on("fetch")
    @retry(on=ConnectionError, attempts=10, jitter=False)
    async def fetch(ctx: EventContext) -> None:
        await body(ctx)

    await krules_app.emit("fetch", "s")
    assert seen == [1, 2]


async def test_the_middleware_defaults_apply_when_a_rule_leaves_backoff_and_cap_unset(
    krules_app: KRulesTestApp,
) -> None:
    krules_app.middleware(RetryMiddleware(default_backoff=2.0, default_cap=5.0))
    _, body = failing(4, lambda: ConnectionError("api down"))

    @krules_app.on("fetch")
    @retry(on=ConnectionError, jitter=False)
    async def fetch(ctx: EventContext) -> None:
        await body(ctx)

    await krules_app.emit("fetch", "s")
    assert krules_app.clock.sleeps == [2.0, 4.0, 5.0, 5.0]


async def test_the_mark_works_above_or_below_on(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(RetryMiddleware())
    above, above_body = failing(1, lambda: ConnectionError("api down"))
    below, below_body = failing(1, lambda: ConnectionError("api down"))

    @retry(on=ConnectionError, jitter=False)
    @krules_app.on("a")
    async def marked_above(ctx: EventContext) -> None:
        await above_body(ctx)

    @krules_app.on("b")
    @retry(on=ConnectionError, jitter=False)
    async def marked_below(ctx: EventContext) -> None:
        await below_body(ctx)

    await krules_app.emit("a", "s")
    await krules_app.emit("b", "s")
    assert above == [1, 2]
    assert below == [1, 2]


async def test_each_retry_is_logged_at_warning(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="middleware.retry")
    krules_app.middleware(RetryMiddleware())
    _, body = failing(2, lambda: ConnectionError("api down"))

    @krules_app.on("fetch")
    @retry(on=ConnectionError, attempts=3, jitter=False)
    async def fetch(ctx: EventContext) -> None:
        await body(ctx)

    await krules_app.emit("fetch", "device-7")
    records = [r for r in caplog.records if r.name == "middleware.retry"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    assert "attempt 1 of 3 failed: ConnectionError: api down" in records[0].getMessage()
    assert "'device-7'" in records[1].getMessage() and "fetch" in records[1].getMessage()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on": "ConnectionError"}, "on='ConnectionError'"),
        ({"on": ()}, "on=()"),
        ({"on": (ConnectionError, KeyboardInterrupt)}, "KeyboardInterrupt"),
        ({"on": DeadLetterEvent}, "DeadLetterEvent is never retried"),
        ({"on": ConnectionError, "attempts": 0}, "attempts=0"),
        ({"on": ConnectionError, "attempts": 2.5}, "attempts=2.5"),
        ({"on": ConnectionError, "attempts": True}, "attempts=True"),
        ({"on": ConnectionError, "backoff": -1}, "backoff=-1"),
        ({"on": ConnectionError, "backoff": "1s"}, "backoff='1s'"),
        ({"on": ConnectionError, "cap": float("inf")}, "cap=inf"),
        ({"on": ConnectionError, "backoff": 2.0, "cap": 1.0}, "cap=1.0 below backoff=2.0"),
        ({"on": ConnectionError, "jitter": "half"}, "jitter='half'"),
    ],
)
def test_invalid_decorator_arguments_are_refused_at_decoration_time(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(RuleDefinitionError, match=r"^@retry got .*") as raised:
        retry(**kwargs)
    assert message in str(raised.value)


def test_the_decorator_written_without_parentheses_says_how_to_write_it() -> None:
    async def handler(ctx: EventContext) -> None: ...

    with pytest.raises(RuleDefinitionError, match="with parentheses"):
        retry(handler)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts_cap": 0}, "max_attempts_cap=0"),
        ({"max_attempts_cap": "3"}, "max_attempts_cap='3'"),
        ({"default_backoff": -0.1}, "default_backoff=-0.1"),
        ({"default_backoff": None}, "default_backoff=None"),
        ({"default_cap": float("nan")}, "default_cap=nan"),
        ({"random": 42}, "random=42"),
    ],
)
def test_invalid_middleware_options_are_refused_with_a_configuration_error(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=r"^RetryMiddleware got .*; pass .*") as raised:
        RetryMiddleware(**kwargs)
    assert message in str(raised.value)
