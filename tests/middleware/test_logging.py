"""The logging middleware: one structured line per handler call, lazy when its level is off."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

import middleware.logging as logging_middleware
from krules.context import EventContext
from krules.errors import ConfigurationError
from krules.partitioning import partition_of
from krules.testing import KRulesTestApp
from middleware.base import ATTEMPTS, DeadLetterEvent, Next, SkipEvent
from middleware.logging import DEFAULT_LOGGER, LoggingMiddleware


def lines(caplog: pytest.LogCaptureFixture, name: str = DEFAULT_LOGGER) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == name]


def rule_name(app: KRulesTestApp) -> str:
    (rule,) = app.container.registry().rules
    return rule.name


async def test_a_successful_call_logs_one_line_with_event_handler_partition_outcome_and_duration(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    krules_app.middleware(LoggingMiddleware())

    @krules_app.on("order.submitted")
    async def validate(ctx: EventContext) -> None:
        pass

    await krules_app.emit("order.submitted", "order-1", {"total": 30})

    (record,) = lines(caplog)
    event = krules_app.recorder.events[0]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert message.startswith(
        f"event_id={event.id} event_type=order.submitted subject='order-1' "
        f"handler={rule_name(krules_app)} partition=0 outcome=ok duration_ms="
    )
    assert float(message.rsplit("duration_ms=", 1)[1]) >= 0
    assert record.exc_info is None


async def test_each_handler_call_of_a_cascade_gets_its_own_line(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    krules_app.middleware(LoggingMiddleware())

    @krules_app.on("order.submitted")
    async def submit(ctx: EventContext) -> None:
        await ctx.emit("order.validated")

    @krules_app.on("order.validated")
    async def validated(ctx: EventContext) -> None:
        pass

    await krules_app.emit("order.submitted", "order-1")

    messages = [record.getMessage() for record in lines(caplog)]
    # the inner call ends first
    assert [m.split(" ", 2)[1] for m in messages] == [
        "event_type=order.validated",
        "event_type=order.submitted",
    ]
    assert all("outcome=ok" in m for m in messages)


async def test_a_skipped_call_is_logged_as_skipped_and_not_counted_as_failed(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    krules_app.middleware(LoggingMiddleware())

    @krules_app.on("x")
    async def skipper(ctx: EventContext) -> None:
        raise SkipEvent

    await krules_app.emit("x", "s")

    (record,) = lines(caplog)
    assert record.levelno == logging.INFO
    assert " outcome=skipped " in record.getMessage()
    assert krules_app.recorder.failures == []


async def test_a_failing_call_is_logged_at_warning_without_traceback_and_the_error_propagates_unchanged(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    krules_app.middleware(LoggingMiddleware())
    raised: list[Exception] = []

    @krules_app.on("x")
    async def broken(ctx: EventContext) -> None:
        error = RuntimeError("boom")
        raised.append(error)
        raise error

    await krules_app.emit("x", "s")

    (record,) = lines(caplog)
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert " outcome=failed " in record.getMessage()
    assert record.getMessage().endswith(" error=RuntimeError('boom')")
    (failure,) = krules_app.recorder.failures
    assert failure.error is raised[0]


async def test_a_dead_lettered_call_is_logged_with_its_reason(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    krules_app.middleware(LoggingMiddleware())

    @krules_app.on("x")
    async def rejecting(ctx: EventContext) -> None:
        raise DeadLetterEvent("The circuit is open.", reason="circuit_open")

    await krules_app.emit("x", "s")

    (record,) = lines(caplog)
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert " outcome=dead_lettered " in message
    assert message.endswith(" error=DeadLetterEvent('The circuit is open.') reason=circuit_open")
    assert isinstance(krules_app.recorder.failures[0].error, DeadLetterEvent)


async def test_an_error_message_spanning_lines_is_logged_on_one_line(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    krules_app.middleware(LoggingMiddleware())

    @krules_app.on("x")
    async def broken(ctx: EventContext) -> None:
        raise ValueError("2 validation errors:\n  total: missing\n  items: empty")

    await krules_app.emit("x", "s")

    (record,) = lines(caplog)
    assert "\n" not in record.getMessage()
    assert record.getMessage().endswith(
        " error=ValueError('2 validation errors:\\n  total: missing\\n  items: empty')"
    )


async def test_failures_are_logged_at_the_configured_level_when_it_is_above_warning(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    krules_app.middleware(LoggingMiddleware(level="error"))

    @krules_app.on("x")
    async def broken(ctx: EventContext) -> None:
        raise ValueError("bad")

    await krules_app.emit("x", "s")

    assert [record.levelno for record in lines(caplog)] == [logging.ERROR]


async def test_json_lines_are_one_json_object_whose_fields_are_also_record_attributes(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    krules_app.middleware(LoggingMiddleware(json=True, partitions=16))

    @krules_app.on("order.submitted")
    async def broken(ctx: EventContext) -> None:
        raise KeyError("total")

    await krules_app.emit("order.submitted", "order-ünïcode")

    (record,) = lines(caplog)
    fields = json.loads(record.getMessage())
    duration = fields.pop("duration_ms")
    assert isinstance(duration, float) and duration >= 0
    assert fields == {
        "event_id": krules_app.recorder.events[0].id,
        "event_type": "order.submitted",
        "subject": "order-ünïcode",
        "handler": rule_name(krules_app),
        "partition": partition_of("order-ünïcode", 16),
        "outcome": "failed",
        "error": "KeyError: 'total'",
    }
    for key, value in fields.items():
        assert getattr(record, key) == value
    assert "\n" not in record.getMessage()


async def test_the_partition_is_the_subjects_partition_among_the_configured_count(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    krules_app.middleware(LoggingMiddleware(partitions=7))

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        pass

    subjects = [f"device-{n}" for n in range(20)]
    for subject in subjects:
        await krules_app.emit("x", subject)

    logged = [int(r.getMessage().split(" partition=")[1].split(" ")[0]) for r in lines(caplog)]
    assert logged == [partition_of(subject, 7) for subject in subjects]
    assert len(set(logged)) > 1


async def test_attempts_recorded_by_a_retry_middleware_are_logged(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)

    async def retry_three_times(ctx: EventContext, next: Next) -> None:
        for attempt in range(1, 4):
            ctx.set_metadata(ATTEMPTS, attempt)
            try:
                await next()
                return
            except RuntimeError:
                if attempt == 3:
                    raise

    krules_app.middleware(LoggingMiddleware())
    krules_app.middleware(retry_three_times)
    calls: list[int] = []

    @krules_app.on("x")
    async def flaky(ctx: EventContext) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("not yet")

    await krules_app.emit("x", "s")

    (record,) = lines(caplog)
    assert " outcome=ok " in record.getMessage()
    assert record.getMessage().endswith(" attempts=3")


async def test_a_logger_object_and_a_numeric_level_are_accepted(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("tests.middleware.handler_lines")
    caplog.set_level(logging.DEBUG, logger=logger.name)
    krules_app.middleware(LoggingMiddleware(logger=logger, level=logging.DEBUG))

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        pass

    await krules_app.emit("x", "s")

    assert [record.levelno for record in lines(caplog, logger.name)] == [logging.DEBUG]
    assert lines(caplog) == []


async def test_a_disabled_level_builds_nothing_and_only_runs_the_handler(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger=DEFAULT_LOGGER)

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the logging middleware did work for a disabled level")

    # Any clock read, partition, metadata read, JSON encoding or record while disabled now fails the call.
    monkeypatch.setattr(logging_middleware, "perf_counter", must_not_run)
    monkeypatch.setattr(logging_middleware, "partition_of", must_not_run)
    monkeypatch.setattr(json.JSONEncoder, "encode", must_not_run)
    monkeypatch.setattr(EventContext, "get_metadata", must_not_run)
    monkeypatch.setattr(logging.Logger, "makeRecord", must_not_run)
    krules_app.middleware(LoggingMiddleware(json=True, partitions=8))
    ran: list[str] = []

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        ran.append(ctx.subject.name)

    await krules_app.emit("x", "s")

    assert ran == ["s"]
    assert krules_app.recorder.failures == []
    assert lines(caplog) == []


async def test_a_failure_with_the_level_disabled_still_propagates_without_a_line(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=DEFAULT_LOGGER)
    krules_app.middleware(LoggingMiddleware())

    @krules_app.on("x")
    async def broken(ctx: EventContext) -> None:
        raise RuntimeError("boom")

    await krules_app.emit("x", "s")

    assert lines(caplog) == []
    assert [str(f.error) for f in krules_app.recorder.failures] == ["boom"]


async def test_a_broken_log_handler_does_not_fail_the_handler_call(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="tests.middleware.broken")

    class Broken(logging.Handler):
        def handle(self, record: logging.LogRecord) -> bool:
            raise RuntimeError("the log pipeline is broken")

    logger = logging.getLogger("tests.middleware.broken")
    monkeypatch.setattr(logger, "handlers", [Broken()])  # restored after the test
    krules_app.middleware(LoggingMiddleware(logger=logger))

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        pass

    await krules_app.emit("x", "s")

    assert krules_app.recorder.failures == []
    assert "LoggingMiddleware could not log a call of" in caplog.text


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("logger", 3),
        ("logger", ""),
        ("level", "LOUD"),
        ("level", "NOTSET"),
        ("level", 0),
        ("level", -10),
        ("level", True),
        ("level", 2.5),
        ("json", "yes"),
        ("json", 1),
        ("partitions", 0),
        ("partitions", True),
        ("partitions", 1.5),
        ("partitions", "4"),
    ],
)
def test_a_bad_option_raises_a_configuration_error_naming_the_option_and_value(
    option: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        LoggingMiddleware(**{option: value})
    assert f"option {option}={value!r} is invalid" in str(caught.value)


def test_level_names_are_case_insensitive() -> None:
    assert LoggingMiddleware(level="debug").level == logging.DEBUG
    assert LoggingMiddleware(level=" Warning ").level == logging.WARNING


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        LoggingMiddleware("krules.handlers")  # type: ignore[call-arg]


async def test_a_line_is_the_record_logging_itself_would_make_with_the_same_fields() -> None:
    made = logging.getLogger("t").makeRecord(
        "t", logging.INFO, logging_middleware.__file__, 0, "a=%s", ("x",), None
    )
    fast = logging_middleware._record("t", logging.INFO, "a=%s", ("x",), {"event_id": "e-1"})

    assert type(fast) is logging.LogRecord
    assert set(fast.__dict__) == set(made.__dict__) | {"event_id"}
    timing = {"created", "msecs", "relativeCreated"}
    assert {k: v for k, v in fast.__dict__.items() if k not in timing | {"event_id"}} == {
        k: v for k, v in made.__dict__.items() if k not in timing
    }
    assert abs(fast.created - made.created) < 5 and abs(fast.relativeCreated - made.relativeCreated) < 5000
    assert 0 <= fast.msecs < 1000 and fast.getMessage() == "a=x"


async def test_a_custom_record_factory_still_makes_the_records(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=DEFAULT_LOGGER)
    krules_app.middleware(LoggingMiddleware())

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        pass

    default = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = default(*args, **kwargs)
        record.tenant = "acme"
        return record

    logging.setLogRecordFactory(factory)
    try:
        await krules_app.emit("x", "s")
    finally:
        logging.setLogRecordFactory(default)

    (line,) = lines(caplog)
    assert line.tenant == "acme"  # type: ignore[attr-defined]
