"""Circuit breaker: opening on failures, dead-lettering while open, probing half-open, and bounded memory."""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import pytest

from krules.context import EventContext
from krules.errors import ConfigurationError
from krules.testing import FakeClock, KRulesTestApp
from middleware.base import ATTEMPTS, DeadLetterEvent, SkipEvent
from middleware.circuit_breaker import CircuitBreakerMiddleware, CircuitOpenError
from middleware.retry import RetryMiddleware, retry
from middleware.timeout import TimeoutMiddleware, timeout


class Flaky:
    """A handler body that fails while ``failing`` is set, and counts the calls that reached it."""

    def __init__(self, failing: bool = True) -> None:
        self.failing = failing
        self.calls = 0

    async def __call__(self, ctx: EventContext) -> None:
        self.calls += 1
        if self.failing:
            raise ConnectionError("payment gateway down")


def breaker_with_changes(**options: Any) -> tuple[CircuitBreakerMiddleware, list[tuple[str, str, str]]]:
    changes: list[tuple[str, str, str]] = []
    breaker = CircuitBreakerMiddleware(on_state_change=lambda *change: changes.append(change), **options)
    return breaker, changes


def errors(app: KRulesTestApp) -> list[type[BaseException]]:
    return [type(f.error) for f in app.recorder.failures]


async def test_consecutive_failures_open_the_circuit(krules_app: KRulesTestApp) -> None:
    breaker, changes = breaker_with_changes(failure_threshold=3)
    krules_app.middleware(breaker)
    gateway = Flaky()

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        await gateway(ctx)

    for _ in range(3):
        await krules_app.emit("charge", "order-1")
    key = krules_app.recorder.failures[0].handler
    assert breaker.state(key) == "open"
    assert changes == [(key, "closed", "open")]
    assert errors(krules_app) == [ConnectionError] * 3


async def test_open_circuit_dead_letters_instead_of_dropping(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(CircuitBreakerMiddleware(failure_threshold=2, open_seconds=30))
    gateway = Flaky()

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        await gateway(ctx)

    for _ in range(2):
        await krules_app.emit("charge", "order-1")
    krules_app.clock.advance(10)
    turn = await krules_app.engine.process(krules_app.engine.new_event("charge", "order-2"))

    assert gateway.calls == 2  # the handler was not called for order-2 ...
    (failure,) = turn.failures  # ... and the event is a failure to dead-letter, not silently gone
    error = failure.error
    assert isinstance(error, CircuitOpenError) and isinstance(error, DeadLetterEvent)
    assert error.reason == "circuit_open"
    assert error.key == failure.handler and error.state == "open"
    assert error.retry_in == pytest.approx(20)
    assert "dead-lettered" in str(error)
    assert copy.copy(error).reason == "circuit_open"


async def test_a_success_resets_the_count_of_consecutive_failures(krules_app: KRulesTestApp) -> None:
    breaker = CircuitBreakerMiddleware(failure_threshold=2)
    krules_app.middleware(breaker)
    gateway = Flaky()

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        await gateway(ctx)

    for failing in (True, False, True, False, True):
        gateway.failing = failing
        await krules_app.emit("charge", "order-1")
    assert gateway.calls == 5
    assert breaker.states() == {krules_app.recorder.failures[0].handler: "closed"}  # one failure so far


async def test_the_circuit_half_opens_after_the_open_time_and_a_successful_probe_closes_it(
    krules_app: KRulesTestApp,
) -> None:
    breaker, changes = breaker_with_changes(failure_threshold=1, open_seconds=30)
    krules_app.middleware(breaker)
    gateway = Flaky()

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        await gateway(ctx)

    await krules_app.emit("charge", "order-1")
    key = krules_app.recorder.failures[0].handler
    krules_app.clock.advance(29.9)
    await krules_app.emit("charge", "order-2")  # still open
    assert gateway.calls == 1

    krules_app.clock.advance(0.1)
    gateway.failing = False
    await krules_app.emit("charge", "order-3")  # the probe
    await krules_app.emit("charge", "order-4")  # closed again: called normally
    assert gateway.calls == 3
    assert breaker.state(key) == "closed"
    assert changes == [(key, "closed", "open"), (key, "open", "half_open"), (key, "half_open", "closed")]
    assert errors(krules_app) == [ConnectionError, CircuitOpenError]


async def test_a_failed_probe_reopens_the_circuit_for_another_open_period(krules_app: KRulesTestApp) -> None:
    breaker, changes = breaker_with_changes(failure_threshold=1, open_seconds=30)
    krules_app.middleware(breaker)
    gateway = Flaky()

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        await gateway(ctx)

    await krules_app.emit("charge", "order-1")
    krules_app.clock.advance(30)
    await krules_app.emit("charge", "order-2")  # the probe fails
    krules_app.clock.advance(29)
    await krules_app.emit("charge", "order-3")  # refused: the open period restarted at the probe

    key = krules_app.recorder.failures[0].handler
    assert gateway.calls == 2
    assert [c[1:] for c in changes] == [("closed", "open"), ("open", "half_open"), ("half_open", "open")]
    assert breaker.state(key) == "open"
    assert errors(krules_app) == [ConnectionError, ConnectionError, CircuitOpenError]


async def test_half_open_lets_at_most_the_configured_probes_through_at_once(
    krules_app: KRulesTestApp,
) -> None:
    breaker = CircuitBreakerMiddleware(failure_threshold=1, open_seconds=5, half_open_probes=2)
    krules_app.middleware(breaker)
    release = asyncio.Event()
    probes_waiting: list[str] = []
    failing = [True]

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        if failing[0]:
            raise ConnectionError("payment gateway down")
        probes_waiting.append(ctx.subject.name)
        await release.wait()

    await krules_app.emit("charge", "order-0")
    failing[0] = False
    krules_app.clock.advance(5)
    probes = [asyncio.create_task(krules_app.emit("charge", f"order-{i}")) for i in (1, 2)]
    while len(probes_waiting) < 2:
        await asyncio.sleep(0)
    await krules_app.emit("charge", "order-3")  # a third call while both probes run: refused
    release.set()
    await asyncio.gather(*probes)

    assert probes_waiting == ["order-1", "order-2"]
    refused = krules_app.recorder.failures[-1]
    assert refused.event.subject == "order-3"
    assert isinstance(refused.error, CircuitOpenError) and refused.error.state == "half_open"
    assert breaker.state(refused.handler) == "closed"


async def test_skipped_and_dead_lettered_calls_are_not_failures(krules_app: KRulesTestApp) -> None:
    breaker = CircuitBreakerMiddleware(failure_threshold=1)
    krules_app.middleware(breaker)

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        if ctx.payload["kind"] == "skip":
            raise SkipEvent()
        raise DeadLetterEvent("The order has no total.", "rejected")

    await krules_app.emit("charge", "order-1", {"kind": "skip"})
    await krules_app.emit("charge", "order-2", {"kind": "dead"})
    await krules_app.emit("charge", "order-3", {"kind": "dead"})
    assert breaker.states() == {}
    assert errors(krules_app) == [DeadLetterEvent, DeadLetterEvent]


async def test_keyed_by_subject_each_subject_has_its_own_circuit(krules_app: KRulesTestApp) -> None:
    breaker = CircuitBreakerMiddleware(
        failure_threshold=2, key=lambda ctx: f"{ctx.handler_name}:{ctx.subject.name}"
    )
    krules_app.middleware(breaker)
    sensor = Flaky()

    @krules_app.on("reading")
    async def read(ctx: EventContext) -> None:
        sensor.failing = ctx.subject.name == "sensor-bad"
        await sensor(ctx)

    for name in ("sensor-bad", "sensor-bad", "sensor-bad", "sensor-ok"):
        await krules_app.emit("reading", name)
    handler = krules_app.recorder.failures[0].handler
    assert breaker.state(f"{handler}:sensor-bad") == "open"
    assert breaker.state(f"{handler}:sensor-ok") == "closed"
    assert sensor.calls == 3
    assert errors(krules_app) == [ConnectionError, ConnectionError, CircuitOpenError]


async def test_an_injected_clock_measures_the_open_time(krules_app: KRulesTestApp) -> None:
    own_clock = FakeClock(start=0.0)
    breaker = CircuitBreakerMiddleware(failure_threshold=1, open_seconds=10, clock=own_clock)
    krules_app.middleware(breaker)
    gateway = Flaky()

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        await gateway(ctx)

    await krules_app.emit("charge", "order-1")
    krules_app.clock.advance(3600)  # the engine's clock does not matter
    await krules_app.emit("charge", "order-2")
    own_clock.advance(10)
    await krules_app.emit("charge", "order-3")
    assert gateway.calls == 2


async def test_memory_stays_bounded_with_a_circuit_per_subject(krules_app: KRulesTestApp) -> None:
    breaker, changes = breaker_with_changes(
        failure_threshold=2, max_circuits=10, key=lambda ctx: ctx.subject.name
    )
    krules_app.middleware(breaker)
    gateway = Flaky()

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        await gateway(ctx)

    for i in range(100):
        await krules_app.emit("charge", f"order-{i}")
        await krules_app.emit("charge", f"order-{i}")  # each subject's circuit opens
    assert len(breaker.states()) == 10
    assert set(breaker.states()) == {f"order-{i}" for i in range(90, 100)}
    assert changes.count(("order-0", "open", "closed")) == 1  # a forgotten open circuit is reported closed

    gateway.failing = False
    for i in range(200, 300):
        await krules_app.emit("charge", f"order-{i}")
    assert len(breaker.states()) == 10  # circuits closed without failures are not stored at all


async def test_a_broken_state_listener_does_not_change_the_outcome(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(key: str, old: str, new: str) -> None:
        raise RuntimeError("metrics backend gone")

    seen: list[str] = []
    breaker = CircuitBreakerMiddleware(
        failure_threshold=1, on_state_change=[broken, lambda key, old, new: seen.append(new)]
    )
    krules_app.middleware(breaker)

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        raise ConnectionError("payment gateway down")

    await krules_app.emit("charge", "order-1")
    assert seen == ["open"]
    assert errors(krules_app) == [ConnectionError]
    assert any("listener" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


async def test_state_changes_are_logged_at_warning(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="middleware.circuit_breaker")
    krules_app.middleware(CircuitBreakerMiddleware(failure_threshold=2))

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        raise ConnectionError("payment gateway down")

    for _ in range(2):
        await krules_app.emit("charge", "order-1")
    (record,) = [r for r in caplog.records if r.name == "middleware.circuit_breaker"]
    assert record.levelno == logging.WARNING
    assert "closed -> open (2 consecutive failures): calls refused for 30s" in record.getMessage()


async def test_a_listener_added_later_is_told_of_state_changes(krules_app: KRulesTestApp) -> None:
    breaker = CircuitBreakerMiddleware(failure_threshold=1)
    gauge: dict[str, str] = {}
    breaker.add_state_listener(lambda key, old, new: gauge.__setitem__(key, new))
    krules_app.middleware(breaker)

    @krules_app.on("charge")
    async def charge(ctx: EventContext) -> None:
        raise ConnectionError("payment gateway down")

    await krules_app.emit("charge", "order-1")
    assert list(gauge.values()) == ["open"]


async def test_an_open_circuit_ends_the_retries_of_a_retry_outside_it(krules_app: KRulesTestApp) -> None:
    krules_app.middleware(RetryMiddleware())
    krules_app.middleware(CircuitBreakerMiddleware(failure_threshold=2))
    attempts: list[int] = []

    @krules_app.on("charge")
    @retry(on=Exception, attempts=5, jitter=False)
    async def charge(ctx: EventContext) -> None:
        attempts.append(ctx.get_metadata(ATTEMPTS))
        raise ConnectionError("payment gateway down")

    await krules_app.emit("charge", "order-1")
    assert attempts == [1, 2]  # the third attempt met the open circuit, which is never retried
    assert errors(krules_app) == [CircuitOpenError]


async def test_a_timed_out_call_counts_as_a_failure(krules_app: KRulesTestApp) -> None:
    breaker = CircuitBreakerMiddleware(failure_threshold=1)
    krules_app.middleware(breaker)
    krules_app.middleware(TimeoutMiddleware())

    @krules_app.on("charge")
    @timeout(0.01)
    async def charge(ctx: EventContext) -> None:
        await asyncio.sleep(5)

    await krules_app.emit("charge", "order-1")
    assert breaker.state(krules_app.recorder.failures[0].handler) == "open"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold=0"),
        ({"failure_threshold": 2.5}, "failure_threshold=2.5"),
        ({"open_seconds": -1}, "open_seconds=-1"),
        ({"open_seconds": "30"}, "open_seconds='30'"),
        ({"open_seconds": float("inf")}, "open_seconds=inf"),
        ({"half_open_probes": 0}, "half_open_probes=0"),
        ({"key": "handler"}, "key='handler'"),
        ({"clock": 12.0}, "clock=12.0"),
        ({"on_state_change": "metrics"}, "on_state_change='metrics'"),
        ({"on_state_change": [print, None]}, "on_state_change=[<built-in function print>, None]"),
        ({"max_circuits": 0}, "max_circuits=0"),
    ],
)
def test_invalid_options_are_refused_with_a_configuration_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^CircuitBreakerMiddleware got .*; pass .*") as raised:
        CircuitBreakerMiddleware(**kwargs)
    assert message in str(raised.value)


def test_an_async_state_listener_is_refused() -> None:
    async def listener(key: str, old: str, new: str) -> None: ...

    with pytest.raises(ConfigurationError, match="not async"):
        CircuitBreakerMiddleware(on_state_change=listener)
