"""Timeout middleware: per-rule limits, the default limit, the error it raises, and retrying it."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from krules.context import EventContext
from krules.errors import ConfigurationError, KRulesError, RuleDefinitionError
from krules.testing import KRulesTestApp
from middleware.base import ATTEMPTS
from middleware.retry import RetryMiddleware, retry
from middleware.timeout import HandlerTimeoutError, TimeoutMiddleware, TimeoutSettings, timeout

# Real (short) limits: asyncio.timeout runs on the event loop's clock, not on the app's FakeClock.
LIMIT = 0.05
TOO_LONG = 5.0  # a handler stuck this long is cancelled at LIMIT, so the test never waits for it


async def test_a_handler_past_its_limit_is_cancelled_and_fails_with_a_handler_timeout_error(
    krules_app: KRulesTestApp,
) -> None:
    krules_app.middleware(TimeoutMiddleware())
    finished: list[bool] = []

    @krules_app.on("report.requested")
    @timeout(LIMIT)
    async def build_report(ctx: EventContext) -> None:
        await asyncio.sleep(TOO_LONG)
        finished.append(True)

    turn = await krules_app.engine.process(krules_app.engine.new_event("report.requested", "r-1"))
    (failure,) = turn.failures
    error = failure.error
    assert isinstance(error, HandlerTimeoutError)
    assert isinstance(error, TimeoutError) and isinstance(error, KRulesError)
    assert error.handler == failure.handler and error.seconds == LIMIT
    assert f"{failure.handler!r}" in str(error) and "time limit of 0.05s" in str(error)
    assert finished == []
    assert copy.copy(error).args == error.args  # rebuildable despite its own constructor


async def test_a_handler_within_its_limit_succeeds(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(TimeoutMiddleware())
    done: list[str] = []

    @krules_app.on("report.requested")
    @timeout(2.0)
    async def build_report(ctx: EventContext) -> None:
        await asyncio.sleep(0)
        done.append(ctx.subject.name)

    await krules_app.emit("report.requested", "r-1")
    assert done == ["r-1"]
    assert krules_app.recorder.failures == []


async def test_unmarked_handlers_have_no_limit_unless_a_default_is_given(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(TimeoutMiddleware())
    done: list[bool] = []

    @krules_app.on("slow")
    async def slow(ctx: EventContext) -> None:
        await asyncio.sleep(LIMIT * 2)
        done.append(True)

    await krules_app.emit("slow", "s")
    assert done == [True]
    assert krules_app.recorder.failures == []


async def test_the_default_limit_applies_to_unmarked_rules_and_a_rules_own_limit_wins() -> None:
    async with KRulesTestApp() as app:
        app.middleware(TimeoutMiddleware(default=LIMIT))
        done: list[str] = []

        @app.on("go")
        async def unmarked(ctx: EventContext) -> None:
            await asyncio.sleep(TOO_LONG)
            done.append("unmarked")

        @app.on("go")
        @timeout(2.0)
        async def marked(ctx: EventContext) -> None:
            await asyncio.sleep(LIMIT * 2)
            done.append("marked")

        await app.emit("go", "s")
        assert done == ["marked"]
        (failure,) = app.recorder.failures
        assert failure.handler.endswith("unmarked")
        assert isinstance(failure.error, HandlerTimeoutError) and failure.error.seconds == LIMIT


async def test_a_timeout_error_raised_by_the_handler_itself_is_not_relabelled(
    krules_app: KRulesTestApp,
) -> None:
    krules_app.middleware(TimeoutMiddleware())

    @krules_app.on("fetch")
    @timeout(2.0)
    async def fetch(ctx: EventContext) -> None:
        raise TimeoutError("the upstream API timed out")

    await krules_app.emit("fetch", "s")
    (failure,) = krules_app.recorder.failures
    assert type(failure.error) is TimeoutError
    assert str(failure.error) == "the upstream API timed out"


async def test_a_retry_wrapping_a_timeout_retries_timed_out_attempts_when_declared(
    krules_app: KRulesTestApp,
) -> None:
    krules_app.middleware(RetryMiddleware())  # registered first: outermost, so each attempt gets the limit
    krules_app.middleware(TimeoutMiddleware())
    attempts: list[int] = []

    @krules_app.on("fetch")
    @retry(on=TimeoutError, attempts=3, backoff=0.5, jitter=False)
    @timeout(LIMIT)
    async def fetch(ctx: EventContext) -> None:
        attempts.append(ctx.get_metadata(ATTEMPTS))
        if len(attempts) < 3:
            await asyncio.sleep(TOO_LONG)

    await krules_app.emit("fetch", "s")
    assert attempts == [1, 2, 3]
    assert krules_app.clock.sleeps == [0.5, 1.0]
    assert krules_app.recorder.failures == []


async def test_timed_out_attempts_are_not_retried_unless_declared(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(RetryMiddleware())
    krules_app.middleware(TimeoutMiddleware())
    attempts: list[int] = []

    @krules_app.on("fetch")
    @retry(on=ConnectionError, attempts=3)
    @timeout(LIMIT)
    async def fetch(ctx: EventContext) -> None:
        attempts.append(ctx.get_metadata(ATTEMPTS))
        await asyncio.sleep(TOO_LONG)

    await krules_app.emit("fetch", "s")
    assert attempts == [1]
    assert [type(f.error) for f in krules_app.recorder.failures] == [HandlerTimeoutError]


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), "1", None, True])
def test_an_invalid_limit_is_refused_at_decoration_time(seconds: Any) -> None:
    with pytest.raises(RuleDefinitionError, match=r"^@timeout got seconds=.*positive number of seconds"):
        timeout(seconds)


def test_the_decorator_written_without_its_limit_says_how_to_write_it() -> None:
    async def handler(ctx: EventContext) -> None: ...

    with pytest.raises(RuleDefinitionError, match=r"e\.g\. @timeout\(2\.5\)"):
        timeout(handler)  # type: ignore[arg-type]


@pytest.mark.parametrize("default", [0, -0.5, float("nan"), "30", True])
def test_an_invalid_default_is_refused_with_a_configuration_error(default: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"^TimeoutMiddleware got default=.*or None for no limit"):
        TimeoutMiddleware(default=default)


def test_a_handler_timeout_can_be_switched_off() -> None:
    assert TimeoutSettings.from_env({"KRULES_HANDLER_TIMEOUT": "off"}).handler_timeout is None
    assert TimeoutSettings.from_env({"KRULES_HANDLER_TIMEOUT": "2.5"}).handler_timeout == 2.5
