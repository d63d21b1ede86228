"""The span recorder: spans of an SDK tracer made at a fraction of its cost, read by its processors
and exporters exactly as the SDK's own spans are."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, Tracer, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, TraceFlags

from middleware._span_recorder import RecordingSpan, SpanRecorder

PARENT = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1))


def provider_with(exporter: InMemorySpanExporter, **kwargs: object) -> TracerProvider:
    provider = TracerProvider(
        resource=Resource.create({"service.name": "t"}), shutdown_on_exit=False, **kwargs
    )  # type: ignore[arg-type]
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def recorder_for(provider: TracerProvider) -> SpanRecorder:
    recorder = SpanRecorder.for_tracer(provider.get_tracer("krules", "1.0"), "krules", "1.0")
    assert recorder is not None
    return recorder


def test_a_recorded_span_exports_like_the_sdks_own_span_of_the_same_call() -> None:
    exporter = InMemorySpanExporter()
    provider = provider_with(exporter)
    attributes = {"cloudevents.event_id": "e-1", "krules.cascade_depth": 0}
    sdk_span = provider.get_tracer("krules", "1.0").start_span(
        "x h", trace.set_span_in_context(trace.NonRecordingSpan(PARENT)), SpanKind.CONSUMER, dict(attributes)
    )
    sdk_span.set_attribute("krules.outcome", "ok")
    sdk_span.end()
    ours = recorder_for(provider).start("x h", PARENT, dict(attributes))
    ours.set_attribute("krules.outcome", "ok")
    ours.end()

    theirs, mine = exporter.get_finished_spans()
    for field in (
        "name",
        "kind",
        "parent",
        "attributes",
        "resource",
        "events",
        "links",
        "dropped_attributes",
    ):
        assert getattr(mine, field) == getattr(theirs, field), field
    assert mine.status.status_code is theirs.status.status_code is StatusCode.UNSET
    assert mine.instrumentation_scope == theirs.instrumentation_scope
    assert mine.context.trace_id == theirs.context.trace_id == PARENT.trace_id
    assert mine.context.trace_flags == theirs.context.trace_flags
    assert mine.context.trace_state == theirs.context.trace_state
    assert mine.start_time is not None and mine.end_time is not None and mine.start_time <= mine.end_time
    assert '"name": "x h"' in mine.to_json()


def test_without_a_parent_the_current_span_is_the_parent_or_a_new_trace_begins() -> None:
    exporter = InMemorySpanExporter()
    recorder = recorder_for(provider_with(exporter))
    with trace.use_span(trace.NonRecordingSpan(PARENT)):
        child = recorder.start("child", None, {})
    root = recorder.start("root", None, {})

    assert child.get_span_context().trace_id == PARENT.trace_id
    assert isinstance(child, RecordingSpan) and child.parent == PARENT
    assert isinstance(root, RecordingSpan) and root.parent is None
    assert root.get_span_context().trace_id != PARENT.trace_id
    assert root.get_span_context().trace_flags.sampled


def test_a_parent_that_was_not_sampled_makes_a_span_that_records_nothing() -> None:
    exporter = InMemorySpanExporter()
    unsampled = SpanContext(PARENT.trace_id, PARENT.span_id, True, TraceFlags(0))
    span = recorder_for(provider_with(exporter)).start("x", unsampled, {})
    span.end()

    assert not span.is_recording() and not span.get_span_context().trace_flags.sampled
    assert span.get_span_context().trace_id == PARENT.trace_id
    assert exporter.get_finished_spans() == ()


def test_any_other_sampler_is_asked_as_the_sdk_asks_it() -> None:
    exporter = InMemorySpanExporter()
    never = recorder_for(provider_with(exporter, sampler=sampling.ALWAYS_OFF)).start("x", None, {})
    always = recorder_for(provider_with(exporter, sampler=sampling.TraceIdRatioBased(1.0))).start(
        "y", PARENT, {"a": 1}
    )

    assert not never.is_recording()
    assert always.is_recording() and always.get_span_context().trace_flags.sampled
    assert isinstance(always, RecordingSpan) and always.attributes == {"a": 1}


def test_user_attributes_events_and_links_go_through_the_sdks_limits_as_on_an_sdk_span() -> None:
    exporter = InMemorySpanExporter()
    limits = SpanLimits(max_span_attributes=3, max_events=1, max_span_attribute_length=4)
    provider = provider_with(exporter, span_limits=limits)
    sdk_span = provider.get_tracer("krules", "1.0").start_span("x", attributes={"a": "1"})
    our_span = recorder_for(provider).start("x", None, {"a": "1"})
    for span in (sdk_span, our_span):
        span.set_attribute("long", "abcdefgh")  # truncated
        span.set_attributes({"list": [1, 2], "bad": object()})  # type: ignore[dict-item]
        span.set_attribute("over", 1)  # the oldest goes
        span.add_event("one", {"k": "v"})
        span.record_exception(ValueError("boom"))  # the second event pushes the first out
        span.add_link(PARENT, {"why": "replay"})
        span.set_status(StatusCode.ERROR, "boom")
        span.end()
        span.set_attribute("late", 1)  # ignored: the span has ended

    theirs, ours = exporter.get_finished_spans()
    assert dict(ours.attributes or {}) == dict(theirs.attributes or {})
    assert "long" not in (ours.attributes or {}) or (ours.attributes or {})["long"] == "abcd"
    assert ours.dropped_attributes == theirs.dropped_attributes >= 1
    assert [(e.name, dict(e.attributes or {})) for e in ours.events] == [
        (e.name, dict(e.attributes or {})) for e in theirs.events
    ]
    assert (
        ours.events[0].attributes is not None and ours.events[0].attributes["exception.type"] == "ValueError"
    )
    assert ours.dropped_events == theirs.dropped_events == 1
    assert [(link.context, dict(link.attributes or {})) for link in ours.links] == [
        (link.context, dict(link.attributes or {})) for link in theirs.links
    ]
    assert ours.status.status_code is theirs.status.status_code is StatusCode.ERROR
    assert ours.status.description == theirs.status.description == "boom"


def test_status_ok_is_final_and_unset_replaces_nothing() -> None:
    span = recorder_for(provider_with(InMemorySpanExporter())).start("x", None, {})
    span.set_status(StatusCode.UNSET)
    span.set_status(StatusCode.OK)
    span.set_status(StatusCode.ERROR, "late")

    assert isinstance(span, RecordingSpan) and span.status.status_code is StatusCode.OK


def test_a_tracer_that_is_not_the_sdks_own_class_is_used_as_it_is() -> None:
    class OwnTracer(Tracer):
        pass

    sdk_tracer = TracerProvider(shutdown_on_exit=False).get_tracer("t")
    assert SpanRecorder.for_tracer(sdk_tracer, "t", None) is not None
    assert SpanRecorder.for_tracer(OwnTracer.__new__(OwnTracer), "t", None) is None
    assert SpanRecorder.for_tracer(trace.NoOpTracer(), "t", None) is None


def test_ending_twice_exports_once() -> None:
    exporter = InMemorySpanExporter()
    span = recorder_for(provider_with(exporter)).start("x", None, {})
    span.end()
    span.end()

    assert len(exporter.get_finished_spans()) == 1


def test_the_attributes_a_span_starts_with_are_bounded_as_the_sdk_bounds_them() -> None:
    exporter = InMemorySpanExporter()
    provider = provider_with(
        exporter, span_limits=SpanLimits(max_span_attributes=2, max_span_attribute_length=4)
    )
    attributes = {"a": "order-123456", "b": 1, "c": "xy", "d": 0}
    provider.get_tracer("krules", "1.0").start_span("x", attributes=dict(attributes)).end()
    recorder_for(provider).start("x", None, dict(attributes)).end()

    theirs, ours = exporter.get_finished_spans()
    assert dict(ours.attributes or {}) == dict(theirs.attributes or {})
    assert ours.dropped_attributes == theirs.dropped_attributes == 2
