"""Tracing middleware: a span per handler call, one trace per cascade (also across instances over
HTTP), failures recorded."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from krules.context import EventContext
from krules.errors import ConfigurationError
from krules.event_types import SUBJECT_PROPERTY_CHANGED
from krules.http.client import AsyncKRulesClient
from krules.http.server import serve_in_background
from krules.testing import KRulesTestApp
from middleware import tracing
from middleware.base import DeadLetterEvent, Next, SkipEvent
from middleware.tracing import TracingMiddleware

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def make_provider(exporter: InMemorySpanExporter, service: str = "krules-test") -> TracerProvider:
    # A private provider: the tests never touch the global one.
    provider = TracerProvider(resource=Resource.create({"service.name": service}), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = make_provider(exporter)
    yield provider
    provider.shutdown()


@pytest.fixture
def traced_app(krules_app: KRulesTestApp, provider: TracerProvider) -> KRulesTestApp:
    krules_app.middleware(TracingMiddleware(tracer_provider=provider))
    return krules_app


def spans(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    """Finished spans by name (each name must occur once)."""
    finished = exporter.get_finished_spans()
    by_name = {span.name: span for span in finished}
    assert len(by_name) == len(finished), [span.name for span in finished]
    return by_name


def traceparent_of(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def parent_span_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def depth(span: ReadableSpan) -> int:
    assert span.attributes is not None
    value = span.attributes["krules.cascade_depth"]
    assert isinstance(value, int)
    return value


def trace_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.trace_id


# -- spans per handler call ----------------------------------------------------------------------
async def test_each_handler_call_gets_a_consumer_span_named_after_event_and_handler(
    traced_app: KRulesTestApp, exporter: InMemorySpanExporter
) -> None:
    @traced_app.on("order.submitted")
    async def validate_order(ctx: EventContext) -> None:
        pass

    @traced_app.on("order.*")
    async def audit(ctx: EventContext) -> None:
        pass

    await traced_app.emit("order.submitted", "order-1", {"total": 30})

    by_name = spans(exporter)
    assert set(by_name) == {
        "order.submitted receive",
        "order.submitted validate_order",
        "order.submitted audit",
    }
    validate = by_name["order.submitted validate_order"]
    assert validate.kind is SpanKind.CONSUMER
    root = traced_app.recorder.of_type("order.submitted")[0]
    assert validate.attributes is not None
    assert dict(validate.attributes) == {
        "cloudevents.event_id": root.id,
        "cloudevents.event_type": "order.submitted",
        "cloudevents.event_source": root.source,
        "cloudevents.event_subject": "order-1",
        "krules.handler": validate_order.__module__ + "." + validate_order.__qualname__,
        "krules.cascade_depth": 0,
        "krules.outcome": "ok",
    }
    assert validate.status.status_code is StatusCode.UNSET


async def test_handlers_of_an_event_without_trace_context_share_one_trace_under_a_receive_span(
    traced_app: KRulesTestApp, exporter: InMemorySpanExporter
) -> None:
    @traced_app.on("x")
    async def first(ctx: EventContext) -> None:
        pass

    @traced_app.on("x")
    async def second(ctx: EventContext) -> None:
        pass

    await traced_app.emit("x", "s")

    by_name = spans(exporter)
    receive = by_name["x receive"]
    assert receive.parent is None
    for name in ("x first", "x second"):
        assert trace_id(by_name[name]) == trace_id(receive)
        assert parent_span_id(by_name[name]) == span_id(receive)
    # the event itself now carries its trace (for dead letters and replays)
    event = traced_app.recorder.of_type("x")[0]
    assert event.extensions == {"traceparent": traceparent_of(receive)}


async def test_the_span_continues_the_trace_of_the_incoming_traceparent(
    traced_app: KRulesTestApp, exporter: InMemorySpanExporter
) -> None:
    @traced_app.on("order.submitted")
    async def validate_order(ctx: EventContext) -> None:
        pass

    await traced_app.emit("order.submitted", "order-1", traceparent=TRACEPARENT, tracestate="vendor=v1")

    span = spans(exporter)["order.submitted validate_order"]
    assert format(trace_id(span), "032x") == TRACE_ID
    assert span.parent is not None and span.parent.is_remote
    assert format(span.parent.span_id, "016x") == PARENT_SPAN_ID
    assert span.get_span_context().trace_state.to_header() == "vendor=v1"  # type: ignore[union-attr]


async def test_the_span_is_current_while_the_handler_runs(
    traced_app: KRulesTestApp, exporter: InMemorySpanExporter
) -> None:
    seen: list[int] = []

    @traced_app.on("x")
    async def handler(ctx: EventContext) -> None:
        seen.append(trace.get_current_span().get_span_context().span_id)

    await traced_app.emit("x", "s")

    assert seen == [span_id(spans(exporter)["x handler"])]
    assert not trace.get_current_span().get_span_context().is_valid  # detached afterwards


# -- one trace for a cascade -----------------------------------------------------------------------
async def test_emitted_events_carry_the_handlers_span_and_the_cascade_is_one_trace(
    traced_app: KRulesTestApp, exporter: InMemorySpanExporter
) -> None:
    @traced_app.on("order.submitted")
    async def validate_order(ctx: EventContext) -> None:
        await ctx.subject.set("status", "validated")
        await ctx.emit("order.validated", {"ok": True}, subject="invoice-1")

    @traced_app.on(SUBJECT_PROPERTY_CHANGED)
    async def on_status(ctx: EventContext) -> None:
        pass

    @traced_app.on("order.validated")
    async def invoice(ctx: EventContext) -> None:
        pass

    await traced_app.emit("order.submitted", "order-1", traceparent=TRACEPARENT, tracestate="vendor=v1")

    by_name = spans(exporter)
    validate = by_name["order.submitted validate_order"]
    changed_event = traced_app.recorder.of_type(SUBJECT_PROPERTY_CHANGED)[0]
    validated_event = traced_app.recorder.of_type("order.validated")[0]
    # both the property change of subject.set and the explicit emit carry the handler's span
    for event in (changed_event, validated_event):
        assert event.extensions is not None
        assert event.extensions["traceparent"] == traceparent_of(validate)
        assert event.extensions["tracestate"] == "vendor=v1"
    for child in (by_name[f"{SUBJECT_PROPERTY_CHANGED} on_status"], by_name["order.validated invoice"]):
        assert parent_span_id(child) == span_id(validate)
        assert child.attributes is not None and child.attributes["krules.cascade_depth"] == 1
    assert {format(trace_id(span), "032x") for span in by_name.values()} == {TRACE_ID}


async def test_a_deep_cascade_is_one_chain_of_spans_across_the_engines_task_bounces(
    traced_app: KRulesTestApp, exporter: InMemorySpanExporter
) -> None:
    @traced_app.on("step")
    async def step(ctx: EventContext) -> None:
        if ctx.payload["n"] < 20:
            await ctx.emit("step", {"n": ctx.payload["n"] + 1})

    await traced_app.emit("step", "s", {"n": 0}, traceparent=TRACEPARENT)

    chain = sorted(exporter.get_finished_spans(), key=depth)
    assert len(chain) == 21
    assert {format(trace_id(span), "032x") for span in chain} == {TRACE_ID}
    for parent, child in itertools.pairwise(chain):
        assert parent_span_id(child) == span_id(parent)
    assert traced_app.recorder.failures == []


async def test_a_sampled_out_trace_records_nothing_and_passes_the_decision_on(
    krules_app: KRulesTestApp, exporter: InMemorySpanExporter
) -> None:
    provider = TracerProvider(sampler=sampling.ALWAYS_OFF, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    krules_app.middleware(TracingMiddleware(tracer_provider=provider))

    @krules_app.on("a")
    async def emitter(ctx: EventContext) -> None:
        await ctx.emit("b")

    await krules_app.emit("a", "s")

    assert exporter.get_finished_spans() == ()
    [root] = krules_app.recorder.of_type("a")
    [child] = krules_app.recorder.of_type("b")
    assert root.extensions is not None and child.extensions is not None
    root_context, child_context = root.extensions["traceparent"], child.extensions["traceparent"]
    assert root_context.split("-")[1] == child_context.split("-")[1]  # one trace
    assert not int(root_context[-2:], 16) & 1 and not int(child_context[-2:], 16) & 1  # not sampled
    provider.shutdown()


async def test_emit_extensions_are_merged_for_the_handler_and_restored_after(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    after: list[Any] = []

    async def tenant(ctx: EventContext, next: Next) -> None:
        ctx.emit_extensions = {"tenant": "acme"}
        await next()
        after.append(ctx.emit_extensions)

    app = KRulesTestApp()  # tenant outside tracing
    app.middleware(tenant)
    app.middleware(TracingMiddleware(tracer_provider=provider))

    @app.on("a")
    async def emitter(ctx: EventContext) -> None:
        await ctx.emit("b", tenant="override")
        await ctx.emit("c")

    async with app:
        await app.emit("a", "s")

    span = spans(exporter)["a emitter"]
    assert app.recorder.of_type("b")[0].extensions == {
        "tenant": "override",
        "traceparent": traceparent_of(span),
    }
    assert app.recorder.of_type("c")[0].extensions == {"tenant": "acme", "traceparent": traceparent_of(span)}
    assert after == [{"tenant": "acme"}]


# -- outcomes --------------------------------------------------------------------------------------
async def test_a_failing_handler_sets_error_status_and_records_the_exception(
    traced_app: KRulesTestApp, exporter: InMemorySpanExporter
) -> None:
    @traced_app.on("x")
    async def broken(ctx: EventContext) -> None:
        raise RuntimeError("boom")

    await traced_app.emit("x", "s")

    span = spans(exporter)["x broken"]
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "RuntimeError: boom"
    [exception] = [event for event in span.events if event.name == "exception"]
    assert exception.attributes is not None
    assert exception.attributes["exception.type"] == "RuntimeError"
    assert exception.attributes["exception.message"] == "boom"
    assert span.attributes is not None and span.attributes["krules.outcome"] == "failed"
    assert len(traced_app.recorder.failures) == 1  # the engine still sees the failure


async def test_a_skipped_event_is_not_an_error(
    traced_app: KRulesTestApp, exporter: InMemorySpanExporter
) -> None:
    @traced_app.on("x")
    async def skipper(ctx: EventContext) -> None:
        raise SkipEvent()

    await traced_app.emit("x", "s")

    span = spans(exporter)["x skipper"]
    assert span.status.status_code is StatusCode.UNSET
    assert not span.events
    assert span.attributes is not None and span.attributes["krules.outcome"] == "skipped"
    assert traced_app.recorder.failures == []


async def test_a_dead_lettered_event_is_an_error_with_its_reason(
    traced_app: KRulesTestApp, exporter: InMemorySpanExporter
) -> None:
    @traced_app.on("x")
    async def rejecter(ctx: EventContext) -> None:
        raise DeadLetterEvent("The order total is negative.", reason="invalid_total")

    await traced_app.emit("x", "s")

    span = spans(exporter)["x rejecter"]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["krules.dead_letter_reason"] == "invalid_total"
    assert span.attributes["krules.outcome"] == "dead_lettered"
    assert [event.name for event in span.events] == ["exception"]


# -- without an SDK ----------------------------------------------------------------------------------
async def test_the_no_op_provider_records_nothing_but_passes_the_incoming_trace_on(
    krules_app: KRulesTestApp,
) -> None:
    krules_app.middleware(TracingMiddleware(tracer_provider=trace.NoOpTracerProvider()))

    @krules_app.on("a")
    async def emitter(ctx: EventContext) -> None:
        await ctx.emit("b")

    await krules_app.emit("a", "traced", traceparent=TRACEPARENT)
    await krules_app.emit("a", "untraced")

    assert krules_app.recorder.of_type("b")[0].extensions == {"traceparent": TRACEPARENT}
    assert krules_app.recorder.of_type("b")[1].extensions is None
    assert krules_app.recorder.failures == []


async def test_a_global_provider_set_after_the_middleware_was_built_is_used_soon_after(
    krules_app: KRulesTestApp,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The global provider is never really set in tests: its lookup is replaced instead.
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    now = [1000.0]
    monkeypatch.setattr(tracing, "monotonic", lambda: now[0])
    krules_app.middleware(TracingMiddleware())

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        pass

    await krules_app.emit("x", "before")
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    now[0] += tracing._GLOBAL_POLL_SECONDS / 2
    await krules_app.emit("x", "too-soon")  # the unset global is looked up once a second
    assert exporter.get_finished_spans() == ()

    now[0] += tracing._GLOBAL_POLL_SECONDS
    await krules_app.emit("x", "after")
    assert set(spans(exporter)) == {"x receive", "x handler"}


def test_the_constructor_rejects_what_is_not_a_provider_or_a_name() -> None:
    with pytest.raises(ConfigurationError, match="tracer_provider must be an OpenTelemetry TracerProvider"):
        TracingMiddleware(tracer_provider="jaeger")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="service_name must be a non-empty string, not ''"):
        TracingMiddleware(service_name="")


# -- across instances over HTTP --------------------------------------------------------------------
@pytest.fixture
async def two_instances(
    exporter: InMemorySpanExporter,
) -> AsyncIterator[tuple[KRulesTestApp, KRulesTestApp]]:
    providers = [make_provider(exporter, "instance-a"), make_provider(exporter, "instance-b")]
    a, b = KRulesTestApp(), KRulesTestApp()
    a.middleware(TracingMiddleware(tracer_provider=providers[0]))
    b.middleware(TracingMiddleware(tracer_provider=providers[1]))
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()
        for provider in providers:
            provider.shutdown()


async def test_one_trace_follows_a_cascade_from_one_instance_to_another_over_http(
    two_instances: tuple[KRulesTestApp, KRulesTestApp], exporter: InMemorySpanExporter
) -> None:
    a, b = two_instances
    b_url: list[str] = []

    @a.on("order.submitted")
    async def submit(ctx: EventContext) -> None:
        await ctx.emit("order.ship", {"carrier": "ups"})

    @a.on("order.ship")
    async def forward_to_shipping(ctx: EventContext) -> None:
        # A bridge to the instance that owns shipping: the event crosses HTTP with its trace context.
        trace_context = {k: v for k, v in (ctx.raw_event.extensions or {}).items() if k.startswith("trace")}
        async with AsyncKRulesClient(b_url[0]) as client:
            await client.emit(ctx.event_type, ctx.subject.name, ctx.payload, **trace_context)

    @b.on("order.ship")
    async def ship(ctx: EventContext) -> None:
        await ctx.subject.set("status", "shipped")

    @b.on(SUBJECT_PROPERTY_CHANGED)
    async def notify(ctx: EventContext) -> None:
        pass

    async with serve_in_background(b.engine) as server:
        b_url.append(server.url)
        await a.emit("order.submitted", "order-1", {"total": 30})
        await a.settle()

    by_name = spans(exporter)
    assert set(by_name) == {
        "order.submitted receive",
        "order.submitted submit",
        "order.ship forward_to_shipping",
        "order.ship ship",
        f"{SUBJECT_PROPERTY_CHANGED} notify",
    }
    by_instance = {name: span.resource.attributes["service.name"] for name, span in by_name.items()}
    assert by_instance["order.ship ship"] == by_instance[f"{SUBJECT_PROPERTY_CHANGED} notify"] == "instance-b"
    assert by_instance["order.submitted submit"] == "instance-a"
    assert len({trace_id(span) for span in by_name.values()}) == 1
    submit_span, ship_span = by_name["order.submitted submit"], by_name["order.ship ship"]
    assert ship_span.parent is not None and ship_span.parent.is_remote
    assert ship_span.parent.span_id == span_id(submit_span)  # B's handler is a child of A's span
    assert parent_span_id(by_name[f"{SUBJECT_PROPERTY_CHANGED} notify"]) == span_id(ship_span)
    assert a.recorder.failures == [] and b.recorder.failures == []


async def test_a_broken_span_processor_is_logged_and_the_handler_still_runs(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(SimpleSpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            raise RuntimeError("processor bug")

    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(Broken(InMemorySpanExporter()))
    krules_app.middleware(TracingMiddleware(tracer_provider=provider))
    ran: list[str] = []

    @krules_app.on("order.submitted")
    async def validate(ctx: EventContext) -> None:
        ran.append(ctx.event_id)

    await krules_app.emit("order.submitted", "order-1")

    assert len(ran) == 1 and krules_app.recorder.failures == []
    assert any("runs untraced" in r.getMessage() for r in caplog.records if r.name == "middleware.tracing")
