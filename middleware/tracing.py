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
is made current, but an incoming ``traceparent``/``tracestate`` is passed on verbatim to the events
the handler emits, so a traced service downstream still sees one trace.

**Configuration.**  :func:`configure_tracing` builds an SDK ``TracerProvider`` from the standard
environment variables (read from the mapping it is given):

``OTEL_TRACES_EXPORTER``
    ``otlp`` (OTLP over HTTP/protobuf), ``console`` (spans as JSON on stdout) or ``none``; several
    may be given separated by commas.  Unset or ``none`` means no tracing: the function returns
    None (unlike the SDK's own default of ``otlp``, so a krules instance never ships spans to a
    collector nobody asked for).
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``
    The full traces URL, or a base URL to which ``/v1/traces`` is appended (default
    ``http://localhost:4318``).
``OTEL_EXPORTER_OTLP_TRACES_HEADERS`` / ``OTEL_EXPORTER_OTLP_HEADERS``
    ``key=value,...`` headers for the collector (e.g. an API key).
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``
    The ``service.name`` backends group spans by (default ``krules``) and further resource
    attributes (``key=value,...``).
``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``
    ``always_on``, ``always_off``, ``traceidratio``, ``parentbased_always_on`` (default),
    ``parentbased_always_off``, ``parentbased_traceidratio`` and its ratio.
``OTEL_SDK_DISABLED``
    ``true`` disables tracing (None is returned).

The exporter's other settings (timeout, compression, certificates) and the batch processor's
(``OTEL_BSP_*``) are read from the process environment by the OpenTelemetry SDK itself.  Wiring::

    provider = configure_tracing(os.environ)
    if provider is not None:                       # None: tracing off, or set up by someone else
        trace.set_tracer_provider(provider)        # (e.g. opentelemetry-instrument); user code and
    tracing = TracingMiddleware()                  # HTTP clients join the spans of the global one
    container.middlewares.override(providers.Object([tracing, ...]))   # outermost: spans cover the rest
    ...
    if provider is not None:
        provider.shutdown()                        # at exit: flush the spans still batched

**Cost** (measured with callgrind, which a busy machine cannot blur; the engine's own handler
call on the order cascade costs ~40k instructions):

* no SDK (global provider unset, or a no-op provider): a few thousand instructions per call; an
  event carrying a ``traceparent`` costs the most (the dict that passes it on).
* an SDK provider recording every span: ~+80k instructions per handler call on the order cascade
  (its share of the root event's ``receive`` span included), plus what the span processor does
  (a ``BatchSpanProcessor`` queues the span; its thread exports).  Spans of the SDK's own
  ``Tracer`` are made by :class:`middleware._span_recorder.SpanRecorder`, which does what the tracer's
  ``start_span``/``end`` do for a sixth of their cost; the rest is the span's place in the
  context, the ``traceparent`` of the events the handler emits, and the attributes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from time import monotonic
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from krules import __version__ as _KRULES_VERSION
from krules.errors import ConfigurationError
from middleware.base import ATTEMPTS, CANCELLED, OK, DeadLetterEvent, Observer, is_failure, outcome_of

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

    from krules.context import EventContext
    from krules.events import Event
    from krules.rules import Rule
    from middleware._span_recorder import SpanRecorder
    from middleware.registry import ChainBuild

_log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SERVICE_NAME", "EXPORTERS", "TracingMiddleware", "configure_tracing", "from_settings"]

DEFAULT_SERVICE_NAME: Final = "krules"
"""The tracer's name and the ``service.name`` used when none is configured."""

EXPORTERS: Final = ("otlp", "console", "none")
"""The values ``OTEL_TRACES_EXPORTER`` accepts (comma-separated)."""

_TRACEPARENT: Final = "traceparent"
_TRACESTATE: Final = "tracestate"
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_DEFAULT_OTLP_ENDPOINT: Final = "http://localhost:4318"
_GLOBAL_POLL_SECONDS: Final = 1.0

_SAMPLERS: Final = (
    "always_on",
    "always_off",
    "parentbased_always_on",
    "parentbased_always_off",
    "traceidratio",
    "parentbased_traceidratio",
)


def _handler_label(rule: Rule) -> str:
    handler = rule.handler
    return str(getattr(handler, "__name__", None) or type(handler).__name__)


class TracingMiddleware(Observer):
    """``async def mw(ctx, next)`` recording an OpenTelemetry span around each handler call.

    ``tracer_provider`` is where spans go (default: the global provider; one set with
    ``trace.set_tracer_provider`` after this middleware was built is used within a second);
    ``service_name`` names the tracer (the instrumentation scope).  The ``service.name``
    backends group spans by is a resource attribute of the provider (``OTEL_SERVICE_NAME``, see
    :func:`configure_tracing`).
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
            return self._carry(ctx)
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
            return self._carry(ctx)
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
        if len(state) == 1:  # untraced, the incoming trace context passed on
            ctx.emit_extensions = state[0]
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

    @staticmethod
    def _carry(ctx: EventContext) -> tuple[Any, ...] | None:
        # Without an SDK nothing is recorded, but the incoming trace context goes on, verbatim, to
        # the events the handler emits, so a traced service downstream still sees one trace.
        extensions = ctx.raw_event.extensions
        if extensions is None or _TRACEPARENT not in extensions:
            return None
        carried = {_TRACEPARENT: extensions[_TRACEPARENT]}
        tracestate = extensions.get(_TRACESTATE)
        if tracestate is not None:
            carried[_TRACESTATE] = tracestate
        previous = ctx.emit_extensions
        ctx.emit_extensions = {**previous, **carried} if previous else carried
        return (previous,)

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


# -- configuration from the environment ----------------------------------------------------------
def configure_tracing(env: Mapping[str, str]) -> SDKTracerProvider | None:
    """An SDK ``TracerProvider`` built from the OpenTelemetry variables in ``env``, or None for no tracing.

    See the module docstring for the variables.  Real exporters sit behind a ``BatchSpanProcessor``
    (spans are exported from a background thread, never on the event loop).  The caller owns the
    provider: pass it to :class:`TracingMiddleware` (and usually ``trace.set_tracer_provider``), and
    call its ``shutdown()`` at exit to flush.  Raises ConfigurationError for unknown values.
    """
    if _flag(env, "OTEL_SDK_DISABLED"):
        return None
    names = _exporter_names(env)
    if not names:
        return None
    # The SDK is imported only here: an instance that does not trace never loads it.
    from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = [_exporter(name, env) for name in names]
    provider = SDKTracerProvider(resource=_resource(env), sampler=_sampler(env))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _flag(env: Mapping[str, str], var: str) -> bool:
    raw = env.get(var, "").strip().lower()
    if raw in ("", "false"):
        return False
    if raw == "true":
        return True
    raise ConfigurationError(f"{var}={env[var]!r} is not a boolean; use true or false.")


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    raw = env.get("OTEL_TRACES_EXPORTER", "")
    names: list[str] = []
    for part in raw.split(","):
        name = part.strip().lower()
        if not name or name in names:
            continue
        if name not in EXPORTERS:
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER={raw!r} names the unknown exporter {name!r}; "
                f"choose from {', '.join(EXPORTERS)}."
            )
        names.append(name)
    if "none" in names:
        if len(names) > 1:
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER={raw!r} combines 'none' with exporters; give either 'none' or "
                "exporters."
            )
        return []
    return names


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # sys.stdout as it is now: the exporter's default was bound when the SDK was imported.
        return ConsoleSpanExporter(out=sys.stdout)
    # Imported here: the OTLP exporter pulls in protobuf and requests, which only its users need.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not endpoint:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or _DEFAULT_OTLP_ENDPOINT
        endpoint = f"{base.rstrip('/')}/v1/traces"
    headers_var = (
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS"
        if env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "").strip()
        else "OTEL_EXPORTER_OTLP_HEADERS"
    )
    headers = _key_values(env, headers_var)
    return OTLPSpanExporter(endpoint=endpoint, headers=headers or None)


def _key_values(env: Mapping[str, str], var: str) -> dict[str, str]:
    """Parse ``key=value,key2=value2`` (values URL-encoded) as the OpenTelemetry spec writes it."""
    pairs: dict[str, str] = {}
    for item in env.get(var, "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # The value is not echoed: header variables carry credentials.
            raise ConfigurationError(
                f"{var} has an entry without 'key=value' form; write it as key1=value1,key2=value2."
            )
        pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


def _resource(env: Mapping[str, str]) -> Resource:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    attributes: dict[str, Any] = dict(_key_values(env, "OTEL_RESOURCE_ATTRIBUTES"))
    service_name = env.get("OTEL_SERVICE_NAME", "").strip()
    if service_name:
        attributes[SERVICE_NAME] = service_name
    else:
        attributes.setdefault(SERVICE_NAME, DEFAULT_SERVICE_NAME)
    return Resource.create(attributes)


def _sampler(env: Mapping[str, str]) -> Sampler:
    from opentelemetry.sdk.trace import sampling

    raw = env.get("OTEL_TRACES_SAMPLER", "").strip()
    name = raw.lower() or "parentbased_always_on"
    if name not in _SAMPLERS:
        raise ConfigurationError(
            f"OTEL_TRACES_SAMPLER={raw!r} is not a sampler krules knows; choose from {', '.join(_SAMPLERS)}."
        )
    fixed = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "parentbased_always_on": sampling.DEFAULT_ON,
        "parentbased_always_off": sampling.DEFAULT_OFF,
    }.get(name)
    if fixed is not None:
        return fixed
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip() or "1.0"
    try:
        ratio = float(arg)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ConfigurationError(
            f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not a sampling ratio; use a number from 0 to 1."
        )
    if name == "traceidratio":
        return sampling.TraceIdRatioBased(ratio)
    return sampling.ParentBasedTraceIdRatio(ratio)
