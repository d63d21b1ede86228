"""Dead-letter middleware: what finally fails is stored as a dlq subject, announced, and still fails."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from krules.config import Settings
from krules.context import EventContext
from krules.dead_letters import INDEX_SUBJECT, DeadLetter, DeadLetters, dead_letter_name
from krules.errors import CascadeDepthExceeded, ConfigurationError
from krules.events import REPLAY_EXTENSION
from krules.testing import KRulesTestApp
from middleware import dead_letter as dead_letter_module
from middleware.base import DeadLetterEvent, SkipEvent
from middleware.circuit_breaker import CircuitBreakerMiddleware, CircuitOpenError
from middleware.dead_letter import DeadLetterMiddleware, reason_of
from middleware.metrics import MetricsMiddleware
from middleware.retry import RetryMiddleware, retry
from middleware.timeout import HandlerTimeoutError, TimeoutMiddleware, timeout


def install(app: KRulesTestApp, **options: Any) -> DeadLetterMiddleware:
    """The dead-letter middleware outside breaker, retry and time-out, as the default chain has it."""
    mw = DeadLetterMiddleware(**options)
    app.middleware(mw)
    app.middleware(CircuitBreakerMiddleware(failure_threshold=2, open_seconds=30))
    app.middleware(RetryMiddleware(random=lambda: 0.5))
    app.middleware(TimeoutMiddleware())
    return mw


async def stored(app: KRulesTestApp) -> list[DeadLetter]:
    return list(await DeadLetters(app.storage).list())


class Flaky:
    """Fails with ConnectionError while ``failing``; counts the calls."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0

    async def __call__(self, ctx: EventContext) -> None:
        self.calls += 1
        if self.failing:
            raise ConnectionError("payment gateway down")


async def test_a_failed_handler_call_is_stored_with_the_original_event_and_still_fails(
    krules_app: KRulesTestApp,
) -> None:
    install(krules_app)

    @krules_app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        await ctx.subject.set("charged", False)
        raise ValueError("card declined\nsecond line")

    turn = await krules_app.engine.process(
        krules_app.engine.new_event("order.submitted", "order-1", {"total": 30, "items": ["book"]})
    )

    (failure,) = turn.failures  # the engine still records the failure ...
    assert isinstance(failure.error, ValueError)
    (record,) = await stored(krules_app)  # ... and the dead letter is stored with the turn
    event = turn.root
    assert record.name == dead_letter_name(
        event.id, krules_app.engine.registry.match("order.submitted")[0].key
    )
    assert record.event["data"] == {"total": 30, "items": ["book"]}
    assert record.event["id"] == event.id and record.event["type"] == "order.submitted"
    assert (record.event_id, record.event_type, record.subject) == (event.id, "order.submitted", "order-1")
    assert record.handler == failure.handler
    assert record.error == {"type": "ValueError", "message": "card declined\nsecond line"}
    assert record.error_line == "ValueError: card declined"
    assert "raise ValueError" in record.traceback and record.traceback.startswith("Traceback")
    assert (record.reason, record.attempts, record.replays) == ("error", 1, 0)
    assert record.failed_at == krules_app.clock.now()
    assert record.partition == 0
    assert await krules_app.stored(INDEX_SUBJECT) == {record.name: record.failed_at}
    assert await krules_app.stored("order-1") == {"charged": False}  # the turn's writes are kept


@pytest.mark.parametrize(
    ("decorate", "body", "reason", "attempts", "error_type"),
    [
        (retry(on=ConnectionError, attempts=3, backoff=0.01), "connection", "error", 3, ConnectionError),
        (timeout(0.01), "sleep", "timeout", 1, HandlerTimeoutError),
        (lambda f: f, "reject", "invalid_total", 1, DeadLetterEvent),
    ],
    ids=["retries_spent", "timeout", "dead_letter_event"],
)
async def test_each_reason_is_recorded_with_the_attempts(
    krules_app: KRulesTestApp,
    decorate: Callable[[Any], Any],
    body: str,
    reason: str,
    attempts: int,
    error_type: type[Exception],
) -> None:
    install(krules_app)

    @krules_app.on("order.submitted")
    @decorate
    async def charge(ctx: EventContext) -> None:
        if body == "connection":
            raise ConnectionError("payment gateway down")
        if body == "sleep":
            await asyncio.sleep(5)
        raise DeadLetterEvent("A negative total is never valid.", reason="invalid_total")

    await krules_app.emit("order.submitted", "order-1", {"total": -1})
    (record,) = await stored(krules_app)
    assert (record.reason, record.attempts, record.error["type"]) == (reason, attempts, error_type.__name__)
    assert isinstance(krules_app.recorder.failures[0].error, error_type)


async def test_an_open_circuit_is_dead_lettered_with_reason_circuit_open(krules_app: KRulesTestApp) -> None:
    install(krules_app)
    gateway = Flaky()
    krules_app.on("charge")(gateway.__call__)

    for i in range(3):  # two failures open the circuit; the third call is refused
        await krules_app.emit("charge", f"order-{i}")

    records = {r.subject: r for r in await stored(krules_app)}
    assert gateway.calls == 2
    assert [records[f"order-{i}"].reason for i in range(3)] == ["error", "error", "circuit_open"]
    assert records["order-2"].error["type"] == CircuitOpenError.__name__
    assert isinstance(krules_app.recorder.failures[-1].error, CircuitOpenError)


async def test_the_loop_guard_is_dead_lettered_and_its_announcement_is_logged_not_emitted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with KRulesTestApp(settings=Settings(max_cascade_depth=3)) as app:
        install(app)

        @app.on("ping")
        async def ping(ctx: EventContext) -> None:
            await ctx.emit("ping")

        with caplog.at_level(logging.WARNING, logger="middleware.dead_letter"):
            await app.emit("ping", "loop")

        (record,) = await stored(app)
        assert record.reason == "loop_guard"
        assert record.event["krulesdepth"] == 3
        assert record.error["type"] == CascadeDepthExceeded.__name__
        assert app.recorder.of_type("error.handler_failed") == []
        assert any("cascade depth limit" in r.getMessage() for r in caplog.records)


async def test_error_handler_failed_is_emitted_as_a_child_of_the_failed_event(
    krules_app: KRulesTestApp,
) -> None:
    install(krules_app)
    alerts: list[dict[str, Any]] = []

    @krules_app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        raise ConnectionError("payment gateway down")

    @krules_app.on("error.handler_failed")
    async def alert(ctx: EventContext) -> None:
        alerts.append({"subject": ctx.subject.name, **ctx.payload})

    await krules_app.emit("order.submitted", "order-1")
    (record,) = await stored(krules_app)
    (announced,) = krules_app.recorder.of_type("error.handler_failed")
    assert announced.parent is not None and announced.parent.type == "order.submitted"
    assert alerts == [
        {
            "subject": "order-1",
            "dlq": record.name,
            "handler": record.handler,
            "reason": "error",
            "error": "ConnectionError: payment gateway down",
            "error_type": "ConnectionError",
            "event_type": "order.submitted",
            "event_id": record.event_id,
            "attempts": 1,
        }
    ]


async def test_a_failing_handler_of_error_handler_failed_is_dead_lettered_without_looping(
    krules_app: KRulesTestApp,
) -> None:
    install(krules_app)

    @krules_app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        raise ConnectionError("payment gateway down")

    @krules_app.on("error.handler_failed")
    async def alert(ctx: EventContext) -> None:
        raise RuntimeError("the pager is down too")

    await krules_app.emit("order.submitted", "order-1")
    records = await stored(krules_app)
    assert sorted(r.event_type for r in records) == ["error.handler_failed", "order.submitted"]
    assert len(krules_app.recorder.of_type("error.handler_failed")) == 1


async def test_emit_event_false_announces_nothing_and_listeners_count_each_dead_letter(
    krules_app: KRulesTestApp,
) -> None:
    metrics = MetricsMiddleware()
    seen: list[tuple[str, str]] = []
    install(
        krules_app, emit_event=False, on_dead_letter=[metrics.record_dead_letter, lambda *a: seen.append(a)]
    )

    @krules_app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        raise DeadLetterEvent("No total.")

    await krules_app.emit("order.submitted", "order-1")
    await krules_app.emit("order.submitted", "order-2")
    handler = krules_app.recorder.failures[0].handler
    assert seen == [(handler, "rejected")] * 2
    sample = metrics.registry.get_sample_value(
        "krules_dead_letters_total", {"handler": handler, "reason": "rejected"}
    )
    assert sample == 2
    assert krules_app.recorder.of_type("error.handler_failed") == []


async def test_skipped_and_successful_calls_are_not_dead_lettered(krules_app: KRulesTestApp) -> None:
    install(krules_app)

    @krules_app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        if ctx.payload.get("skip"):
            raise SkipEvent()

    await krules_app.emit("order.submitted", "order-1", {"skip": True})
    await krules_app.emit("order.submitted", "order-2")
    assert await stored(krules_app) == []
    assert krules_app.recorder.failures == []


async def test_processing_the_same_event_again_rewrites_the_same_dead_letter(
    krules_app: KRulesTestApp,
) -> None:
    install(krules_app)
    gateway = Flaky()
    krules_app.on("charge")(gateway.__call__)
    event = krules_app.engine.new_event("charge", "order-1")

    await krules_app.engine.process(event)
    krules_app.clock.advance(60)
    await krules_app.engine.process(event)  # e.g. a turn re-run after a crash

    (record,) = await stored(krules_app)
    assert record.failed_at == krules_app.clock.now()


async def test_two_failing_handlers_of_one_event_get_one_dead_letter_each(krules_app: KRulesTestApp) -> None:
    install(krules_app)

    @krules_app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        raise ConnectionError("payment gateway down")

    @krules_app.on("order.submitted")
    async def reserve(ctx: EventContext) -> None:
        raise KeyError("sku-1")

    await krules_app.emit("order.submitted", "order-1")
    records = await stored(krules_app)
    assert sorted(r.error["type"] for r in records) == ["ConnectionError", "KeyError"]
    assert len({r.name for r in records}) == 2
    assert len(await krules_app.stored(INDEX_SUBJECT)) == 2


async def test_a_failing_dead_letter_write_is_logged_and_the_original_error_still_propagates(
    krules_app: KRulesTestApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("bug in the dead-letter store")

    monkeypatch.setattr(dead_letter_module, "write_dead_letter", broken)
    install(krules_app)

    @krules_app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        raise ConnectionError("payment gateway down")

    with caplog.at_level(logging.ERROR, logger="middleware.dead_letter"):
        await krules_app.emit("order.submitted", "order-1")

    (failure,) = krules_app.recorder.failures
    assert isinstance(failure.error, ConnectionError)  # not the middleware's RuntimeError
    (logged,) = [r for r in caplog.records if r.name == "middleware.dead_letter"]
    assert "could not dead-letter" in logged.getMessage()
    assert logged.exc_info is not None and "bug in the dead-letter store" in str(logged.exc_info[1])
    (announced,) = krules_app.recorder.of_type("error.handler_failed")
    assert announced.data["dlq"] is None


async def test_a_replay_that_succeeds_runs_only_the_failed_handler_and_deletes_the_dead_letter(
    krules_app: KRulesTestApp,
) -> None:
    install(krules_app)
    gateway = Flaky()
    others: list[str] = []
    krules_app.on("charge")(gateway.__call__)

    @krules_app.on("charge")
    async def notify(ctx: EventContext) -> None:
        others.append(ctx.event_id)

    await krules_app.emit("charge", "order-1", {"total": 5})
    (record,) = await stored(krules_app)
    gateway.failing = False

    replayed = record.replay_event(1)
    assert replayed.id == f"{record.event_id}.replay-1"
    assert replayed.extensions is not None and replayed.extensions[REPLAY_EXTENSION] == record.handler
    turn = await krules_app.engine.process(replayed)

    assert turn.failures == []
    assert gateway.calls == 2 and len(others) == 1  # the other handler did not run again
    assert await stored(krules_app) == []
    assert await krules_app.stored(record.name) == {}
    assert await krules_app.stored(INDEX_SUBJECT) == {}


async def test_a_replay_that_fails_again_updates_the_same_dead_letter_and_counts_it(
    krules_app: KRulesTestApp,
) -> None:
    install(krules_app)
    gateway = Flaky()
    krules_app.on("charge")(gateway.__call__)

    await krules_app.emit("charge", "order-1", {"total": 5})
    (first,) = await stored(krules_app)
    krules_app.clock.advance(60)
    await krules_app.engine.process(first.replay_event(1))

    (again,) = await stored(krules_app)
    assert again.name == first.name
    assert again.replays == 1
    assert again.failed_at == first.failed_at + 60
    assert again.event == first.event  # the original event, not the replay
    assert again.event_id == first.event_id
    assert len(krules_app.recorder.of_type("error.handler_failed")) == 2


async def test_a_payload_json_cannot_hold_is_stored_as_text(krules_app: KRulesTestApp) -> None:
    install(krules_app)

    @krules_app.on("order.submitted")
    async def forward(ctx: EventContext) -> None:
        await ctx.emit("order.tagged", {"tags": {"a"}, "ratio": float("nan")})  # children are not encoded

    @krules_app.on("order.tagged")
    async def tag(ctx: EventContext) -> None:
        raise ValueError("no tags")

    await krules_app.emit("order.submitted", "order-1")
    (record,) = await stored(krules_app)
    assert record.event["data"] == {"tags": "{'a'}", "ratio": "nan"}
    assert record.event_type == "order.tagged"


def test_reasons_follow_the_exception() -> None:
    assert reason_of(CircuitOpenError("h", "open", 3.0)) == "circuit_open"
    assert reason_of(DeadLetterEvent("bad")) == "rejected"
    assert reason_of(HandlerTimeoutError("h", 1.0)) == "timeout"
    assert reason_of(TimeoutError()) == "timeout"
    assert reason_of(CascadeDepthExceeded(3, ["a", "b"])) == "loop_guard"
    assert reason_of(ValueError("x")) == "error"


@pytest.mark.parametrize(
    "options",
    [{"emit_event": "yes"}, {"on_dead_letter": "metrics"}, {"on_dead_letter": [print, 3]}],
    ids=["emit_event", "listener", "listener_list"],
)
def test_bad_options_are_refused_with_one_sentence(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=r"^DeadLetterMiddleware got .*\.$"):
        DeadLetterMiddleware(**options)


def test_an_async_listener_is_refused() -> None:
    async def listener(handler: str, reason: str) -> None: ...

    with pytest.raises(ConfigurationError, match="not async"):
        DeadLetterMiddleware(on_dead_letter=listener)


class BuggyMiddleware:
    """A middleware with a bug, before or after the rest of the chain."""

    def __init__(self, when: str) -> None:
        self.when = when

    async def __call__(self, ctx: EventContext, next: Any) -> None:
        if self.when == "before":
            raise KeyError("bug before next()")
        await next()
        raise KeyError("bug after next()")


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_bug_in_a_middleware_outside_the_dead_letter_one_is_logged_and_the_event_dead_lettered(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    krules_app.middleware(BuggyMiddleware(when))  # outermost: the dead-letter middleware never sees its error
    install(krules_app)
    calls: list[str] = []

    @krules_app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        calls.append(ctx.event_id)

    with caplog.at_level(logging.WARNING):
        await krules_app.emit("order.submitted", "order-1", {"total": 30})

    (failure,) = krules_app.recorder.failures
    assert isinstance(failure.error, KeyError)
    (engine_line,) = [r for r in caplog.records if r.name == "krules.engine" and r.levelno == logging.ERROR]
    assert engine_line.exc_info is not None and f"bug {when} next()" in str(engine_line.exc_info[1])
    (record,) = await stored(krules_app)
    assert record.event["data"] == {"total": 30} and record.reason == "error"
    assert record.error == {"type": "KeyError", "message": f"'bug {when} next()'"}
    (announced,) = krules_app.recorder.of_type("error.handler_failed")
    assert announced.data["dlq"] == record.name
    assert len(calls) == (0 if when == "before" else 1)


async def test_a_failure_the_dead_letter_middleware_saw_is_dead_lettered_once(
    krules_app: KRulesTestApp,
) -> None:
    install(krules_app)

    @krules_app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        raise ValueError("card declined")

    await krules_app.emit("order.submitted", "order-1")

    assert len(await stored(krules_app)) == 1
    assert len(krules_app.recorder.of_type("error.handler_failed")) == 1


# -- bounded ---------------------------------------------------------------------------------------
async def test_past_the_cap_the_oldest_dead_letters_are_deleted_counted_and_logged(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = MetricsMiddleware()
    krules_app.middleware(
        DeadLetterMiddleware(
            emit_event=False, max_dead_letters=20, on_dropped=metrics.record_dead_letters_dropped
        )
    )

    @krules_app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        raise ConnectionError("payment gateway down")

    kept: list[int] = []
    with caplog.at_level(logging.WARNING, logger="middleware.dead_letter"):
        for n in range(50):
            krules_app.clock.advance(1)  # distinct failure times: "oldest" is well defined
            await krules_app.emit("order.submitted", f"order-{n}")
            kept.append(len(await DeadLetters(krules_app.storage).index()))

    records = await stored(krules_app)
    assert max(kept) <= 20 and 18 <= len(records) <= 20
    assert records[-1].subject == "order-49"  # the newest is never the one dropped
    assert [r.subject for r in records] == [f"order-{n}" for n in range(50 - len(records), 50)]
    dropped = metrics.registry.get_sample_value("krules_dead_letters_dropped_total")
    assert dropped == 50 - len(records)
    warnings = [r.getMessage() for r in caplog.records if r.name == "middleware.dead_letter"]
    assert warnings and all("more than KRULES_MAX_DEAD_LETTERS=20: deleted the" in w for w in warnings)


async def test_a_dead_letter_deleted_elsewhere_only_makes_the_next_check_come_sooner(
    krules_app: KRulesTestApp,
) -> None:
    krules_app.middleware(DeadLetterMiddleware(emit_event=False, max_dead_letters=5))

    @krules_app.on("x")
    async def fail(ctx: EventContext) -> None:
        raise ValueError("no")

    for n in range(4):
        krules_app.clock.advance(1)
        await krules_app.emit("x", f"s-{n}")
    await DeadLetters(krules_app.storage).purge()  # an operator purges meanwhile
    for n in range(4, 9):
        krules_app.clock.advance(1)
        await krules_app.emit("x", f"s-{n}")

    assert [r.subject for r in await stored(krules_app)] == [f"s-{n}" for n in range(4, 9)]  # none dropped


@pytest.mark.parametrize(
    ("env", "redis", "expected"),
    [
        ({}, False, 10_000),
        ({}, True, None),
        ({"KRULES_MAX_DEAD_LETTERS": "500"}, True, 500),
        ({"KRULES_MAX_DEAD_LETTERS": "0"}, False, None),
        ({"KRULES_MAX_DEAD_LETTERS": "none"}, False, None),
    ],
    ids=["embedded-default", "redis-default", "set", "zero", "none"],
)
def test_the_cap_krules_run_installs_comes_from_the_setting_and_the_mode(
    env: dict[str, str], redis: bool, expected: int | None
) -> None:
    from middleware.registry import build_default_chain

    settings = Settings(redis_url="redis://127.0.0.1:1/0" if redis else None)
    chain = build_default_chain(settings, env={"KRULES_MIDDLEWARE": "metrics,dead_letter", **env})
    (mw,) = [m for m in chain.middlewares if isinstance(m, DeadLetterMiddleware)]
    assert mw.max_dead_letters == expected
    with pytest.raises(ConfigurationError, match="KRULES_MAX_DEAD_LETTERS='-1' is out of range"):
        Settings.from_env({"KRULES_MAX_DEAD_LETTERS": "-1"}, extra=[dead_letter_module.DeadLetterSettings])
