"""Tracing middleware: one OpenTelemetry span per handler call, one trace per cascade.

**What a span holds.**  Every handler call gets a span of kind ``CONSUMER`` named
``"<event type> <handler>"`` (``"order.submitted validate_order"``), with the attributes
``cloudevents.event_id``, ``cloudevents.event_type``, ``cloudevents.event_source``,
``cloudevents.event_subject`` (CloudEvents semantic conventions), ``krules.handler`` (the handler's
dotted name), ``krules.cascade_depth`` and, when the call ends, ``krules.outcome`` (``ok``,
``skipped``, ``dead_lettered``, ``failed`` or ``cancelled``) and ``krules.attempts`` (when the
retry middleware recorded it).  A failed call records its exception and has status ``ERROR``; a
:class:`~middleware.base.SkipEvent` is not a failure; a :class:`~middleware.base.DeadLetterEvent`
is one, with ``krules.dead_letter_reason`` set to its reason.

**How context flows.**  The span's parent comes from the incoming event's ``traceparent`` and
``tracestate`` extensions (the CloudEvents distributed-tracing extension, read with the W3C
TraceContext propagator).  An event that arrives without them (``krules emit``, a client that does
not trace) first gets one ``"<event type> receive"`` span, a child of whatever span is current (or
a new trace), whose context is stamped on the event: all its handlers are children of that span,
so they share one trace, and the event keeps its trace in a dead letter or a replay.

While the handler runs its span is the current span (so user code, HTTP client instrumentation
and log correlation see it), and ``ctx.emit_extensions`` carries the span's own
``traceparent``/``tracestate`` (merged over what an outer middleware put there, and restored
afterwards): every event the handler emits, including the property-change events of
``subject.set``, is a child of the span.  Those events are handled inline, or by another instance
after crossing HTTP or a stream, and their handlers' spans join the same trace.  An inline child
finds its parent span directly (no re-parsing of the header it carries).

**Without an SDK** (the global provider unset, or a no-op provider) nothing is recorded and no span
is made current; the engine itself passes an incoming ``traceparent``/``tracestate`` on verbatim to
the events the handler emits (as it does when tracing is left out), so a traced service downstream
still sees one trace.

**Configuration.**  ``krules run`` installs it when the ``OTEL_*`` variables name an exporter
(:func:`from_settings`); :func:`middleware.tracing_setup.configure_tracing` builds that provider.

**Cost**: see the README's performance section (``python -m bench.default_chain --instructions``).
Spans of the SDK's own ``Tracer`` are made by :class:`middleware._span_recorder.SpanRecorder`.
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from krules.errors import ConfigurationError
from krules.version import __version__ as _KRULES_VERSION
from middleware.base import ATTEMPTS, CANCELLED, OK, DeadLetterEvent, Observer, is_failure, outcome_of
from middleware.tracing_setup import DEFAULT_SERVICE_NAME, configure_tracing

if TYPE_CHECKING:
    from krules.context import EventContext
    from krules.events import Event
    from krules.rules import Rule
    from middleware._span_recorder import SpanRecorder
    from middleware.registry import ChainBuild

_log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SERVICE_NAME", "TracingMiddleware", "from_settings"]


_TRACEPARENT: Final = "traceparent"
_TRACESTATE: Final = "tracestate"
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_GLOBAL_POLL_SECONDS: Final = 1.0


def _handler_label(rule: Rule) -> str:
    handler = rule.handler
    return str(getattr(handler, "__name__", None) or type(handler).__name__)


class TracingMiddleware(Observer):
    """``async def mw(ctx, next)`` recording an OpenTelemetry span around each handler call.

    ``tracer_provider`` is where spans go (default: the global provider; one set with
    ``trace.set_tracer_provider`` after this middleware was built is used within a second);
    ``service_name`` names the tracer (the instrumentation scope).  The ``service.name``
    backends group spans by is a resource attribute of the provider (``OTEL_SERVICE_NAME``, see
    :func:`~middleware.tracing_setup.configure_tracing`).
    """

    __slots__ = (
        "_live",
        "_next_poll",
        "_polling",
        "_receive_cache",
        "_recorder",
        "_tracer",
        "service_name",
        "tracer_provider",
    )

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        service_name: str = DEFAULT_SERVICE_NAME,
    ) -> None:
        if tracer_provider is not None and not isinstance(tracer_provider, trace.TracerProvider):
            raise ConfigurationError(
                f"TracingMiddleware's tracer_provider must be an OpenTelemetry TracerProvider or None, "
                f"not {tracer_provider!r}."
            )
        if not isinstance(service_name, str) or not service_name.strip():
            raise ConfigurationError(
                f"TracingMiddleware's service_name must be a non-empty string, not {service_name!r}."
            )
        self.tracer_provider = tracer_provider
        """The provider given, or None for the global one."""
        self.service_name = service_name
        """The tracer's (instrumentation scope's) name."""
        self._tracer: trace.Tracer | None = None
        self._recorder: SpanRecorder | None = None
        self._polling = False
        self._next_poll = 0.0
        # Contexts of this middleware's spans still running, by the trace context stamped on the
        # events they emit: an event handled inline finds its parent here instead of parsing it.
        self._live: dict[tuple[str, str | None], trace.SpanContext] = {}
        self._receive_cache: tuple[tuple[str, str | None], trace.SpanContext] | None = None
        self._resolve(tracer_provider or trace.get_tracer_provider())

    def _resolve(self, provider: trace.TracerProvider) -> trace.Tracer | None:
        # No SDK (the global provider unset, or a no-op one): no tracer, the call only passes the
        # incoming trace context on.  The global provider can be set once: while it is unset it is
        # looked up again every _GLOBAL_POLL_SECONDS (a lookup per call would cost more than the
        # whole no-op path), once set it is final.
        self._polling = self.tracer_provider is None and isinstance(provider, trace.ProxyTracerProvider)
        if isinstance(provider, trace.NoOpTracerProvider | trace.ProxyTracerProvider):
            self._tracer = None
        else:
            self._tracer = provider.get_tracer(self.service_name, _KRULES_VERSION)
        self._recorder = None
        if self._tracer is not None:
            from middleware._span_recorder import SpanRecorder  # loads the SDK, which only tracing needs

            self._recorder = SpanRecorder.for_tracer(self._tracer, self.service_name, _KRULES_VERSION)
        return self._tracer

    def enter(self, ctx: EventContext) -> tuple[Any, ...] | None:
        """Start the call's span, make it current and stamp it on the events the call emits."""
        tracer = self._tracer
        if self._polling:
            now = monotonic()
            if now >= self._next_poll:
                self._next_poll = now + _GLOBAL_POLL_SECONDS
                tracer = self._resolve(trace.get_tracer_provider())
        if tracer is None:
            return None  # nothing to record; the engine passes the incoming trace context on
        # A failure of the tracing itself (e.g. a span processor's bug) must not fail the call:
        # it is logged and the call runs untraced.
        try:
            event = ctx.raw_event
            extensions = event.extensions
            if extensions is None or _TRACEPARENT not in extensions:
                parent = self._receive(tracer, event, extensions)
            else:
                parent = self._parent(extensions)
            attributes = _event_attributes(event)
            attributes["krules.handler"] = ctx.rule.name
            name = f"{event.type} {_handler_label(ctx.rule)}"
            recorder = self._recorder
            if recorder is not None:
                span = recorder.start(name, parent, attributes)
            else:  # exceptions are recorded in exit, where SkipEvent and DeadLetterEvent are told apart
                span = tracer.start_span(
                    name,
                    None if parent is None else trace.set_span_in_context(trace.NonRecordingSpan(parent)),
                    SpanKind.CONSUMER,
                    attributes,
                    record_exception=False,
                    set_status_on_exception=False,
                )
            # attach/detach is what trace.use_span does, without its generator-based context manager.
            span_context = trace.set_span_in_context(span)
            own = span.get_span_context()
            carrier = _carrier(own)
        except Exception:
            _log.exception(
                "could not start the span of %s (event %s); the call runs untraced",
                ctx.rule.name,
                ctx.event_id,
            )
            return None
        previous = ctx.emit_extensions
        key: tuple[str, str | None] | None = None
        if carrier is not None:
            key = (carrier[_TRACEPARENT], carrier.get(_TRACESTATE))
            self._live[key] = own
            # A new dict each time: the engine may hand emit_extensions itself to an emitted event.
            ctx.emit_extensions = {**previous, **carrier} if previous else carrier
        return span, span.is_recording(), otel_context.attach(span_context), previous, key

    def exit(self, ctx: EventContext, state: tuple[Any, ...] | None, error: BaseException | None) -> None:
        """Record the outcome on the span, end it, and restore the context and emit extensions."""
        if state is None:
            return
        span, recording, token, previous, key = state
        otel_context.detach(token)
        ctx.emit_extensions = previous
        if key is not None:
            self._live.pop(key, None)
        try:
            if error is None:
                outcome = OK
            else:
                outcome = outcome_of(error)
                if recording and is_failure(error):
                    if isinstance(error, DeadLetterEvent):
                        span.set_attribute("krules.dead_letter_reason", error.reason)
                    _record_failure(span, error)
                elif recording and outcome == CANCELLED:  # not the handler's fault, still not ok
                    span.set_status(Status(StatusCode.ERROR, "cancelled"))
            if recording:
                span.set_attribute("krules.outcome", outcome)
                attempts = ctx.get_metadata(ATTEMPTS)
                if attempts is not None:
                    span.set_attribute("krules.attempts", attempts)
            span.end()
        except Exception:
            _log.exception("could not end the span of %s (event %s)", ctx.rule.name, ctx.event_id)

    def _parent(self, extensions: dict[str, Any]) -> trace.SpanContext:
        """The span the event's ``traceparent``/``tracestate`` name: a live local span's, or parsed."""
        key = (extensions[_TRACEPARENT], extensions.get(_TRACESTATE))
        parent = self._live.get(key)
        if parent is not None:
            return parent
        receive = self._receive_cache
        if receive is not None and receive[0] == key:
            return receive[1]
        return trace.get_current_span(_PROPAGATOR.extract(extensions)).get_span_context()

    def _receive(
        self, tracer: trace.Tracer, event: Event, extensions: dict[str, Any] | None
    ) -> trace.SpanContext | None:
        """Give an event that came without a trace context a ``receive`` span, stamped on the event.

        Every handler of the event then has that span as parent, so they (and their cascades) share
        one trace, and the event carries its trace wherever it goes next (a dead letter, a replay).
        No await between the check and the stamp: concurrent handlers of the event see one span.
        """
        name = f"{event.type} receive"
        recorder = self._recorder
        if recorder is not None:
            span = recorder.start(name, None, _event_attributes(event))
        else:
            span = tracer.start_span(name, kind=SpanKind.CONSUMER, attributes=_event_attributes(event))
        span.end()
        span_context = span.get_span_context()
        carrier = _carrier(span_context)
        if carrier is None:  # not sampled into existence (an invalid span): nothing to propagate
            return None
        # A new dict: a child's extensions may be its parent handler's emit_extensions itself.
        event.extensions = {**extensions, **carrier} if extensions else carrier
        self._receive_cache = ((carrier[_TRACEPARENT], carrier.get(_TRACESTATE)), span_context)
        return span_context

    def __repr__(self) -> str:
        return f"TracingMiddleware(service_name={self.service_name!r})"


def _event_attributes(event: Event) -> dict[str, str | int]:
    return {
        "cloudevents.event_id": event.id,
        "cloudevents.event_type": event.type,
        "cloudevents.event_source": event.source,
        "cloudevents.event_subject": event.subject,
        "krules.cascade_depth": event.depth,
    }


def _carrier(span_context: trace.SpanContext) -> dict[str, str] | None:
    """``traceparent`` (and ``tracestate``) for ``span_context`` in the W3C Trace Context format, as
    the TraceContext propagator writes them; None for an invalid context (nothing to propagate)."""
    if not span_context.is_valid:
        return None
    # %-formatting: about half the cost of the same f-string format specs, per span.
    carrier = {
        _TRACEPARENT: _TRACEPARENT_FORMAT
        % (span_context.trace_id, span_context.span_id, span_context.trace_flags)
    }
    trace_state = span_context.trace_state
    if trace_state:
        carrier[_TRACESTATE] = trace_state.to_header()
    return carrier


_TRACEPARENT_FORMAT: Final = "00-%032x-%016x-%02x"


def _record_failure(span: trace.Span, exc: BaseException) -> None:
    try:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    except Exception:  # the handler's own error is what propagates, never one of the tracing
        _log.exception("could not record the failure %r on its span", exc)


def from_settings(build: ChainBuild) -> TracingMiddleware | None:
    """The tracing ``krules run`` installs: spans to ``build.tracer_provider``, else to the provider
    the ``OTEL_*`` variables configure (:func:`configure_tracing`); None when there is no exporter
    (nothing to record: tracing is left out)."""
    provider = build.tracer_provider if build.tracer_provider is not None else configure_tracing(build.env)
    return None if provider is None else TracingMiddleware(tracer_provider=provider)
