"""The default middleware chain of ``krules run``, built from the settings (``KRULES_*``, ``OTEL_*``).

Which built-ins are on is ``KRULES_MIDDLEWARE`` (default: all; see :mod:`middleware.names` for the
order and why).  Each is configured from its settings, and a bad value stops start-up with one
sentence (the settings parse them; the middleware validate again):

============== ==================================================================================
tracing        on when ``OTEL_TRACES_EXPORTER`` is ``otlp`` or ``console`` (:func:`configure_tracing`);
               without an exporter there is nothing to record, and it is left out (costs nothing)
logging        ``KRULES_HANDLER_LOG_LEVEL`` (INFO), ``KRULES_LOG_JSON``; one line per handler call
metrics        served at ``/metrics`` on the instance's HTTP port
partitioning   Redis mode, when this instance owns only some of the partitions
dead_letter    dead-letter subjects ``dlq-<id>`` and ``error.handler_failed`` events
circuit_breaker ``KRULES_CIRCUIT_FAILURES`` (5), ``KRULES_CIRCUIT_OPEN_SECONDS`` (30),
               ``KRULES_CIRCUIT_KEY`` (``handler`` or ``subject``: one circuit per handler and subject)
retry          for rules marked ``@retry(on=...)``; ``KRULES_RETRY_MAX_ATTEMPTS`` caps what a rule asks,
               ``KRULES_RETRY_BACKOFF`` / ``KRULES_RETRY_CAP`` are the defaults of a mark
timeout        for rules marked ``@timeout(s)``; ``KRULES_HANDLER_TIMEOUT`` limits every other rule
============== ==================================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from middleware.base import Middleware
from middleware.names import parse_middleware_names

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from krules.config import Settings
    from krules.context import EventContext
    from middleware.metrics import MetricsMiddleware

__all__ = ["DefaultChain", "build_default_chain"]


@dataclass
class DefaultChain:
    """The middleware to install, outermost first, and the parts an instance wires elsewhere."""

    middlewares: list[Middleware] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    metrics: MetricsMiddleware | None = None
    """Serve ``metrics_route(metrics)``; add ``metrics.observe_event`` to the engine's observers."""
    tracer_provider: TracerProvider | None = None
    """Shut it down when the instance stops (flushes the spans)."""


def _per_subject(ctx: EventContext) -> str:
    return f"{ctx.rule.name}:{ctx.subject.name}"


def build_default_chain(
    settings: Settings,
    *,
    env: Mapping[str, str] | None = None,
    metrics_registry: CollectorRegistry | None = None,
    tracer_provider: TracerProvider | None = None,
) -> DefaultChain:
    """Build the built-ins ``settings.middleware`` names, configured from ``settings`` and ``env``."""
    env = os.environ if env is None else env
    chain = DefaultChain()
    names = parse_middleware_names(settings.middleware)
    if "metrics" in names:
        from middleware.metrics import MetricsMiddleware

        chain.metrics = MetricsMiddleware(registry=metrics_registry)
    metrics = chain.metrics

    def add(name: str, mw: Middleware) -> None:
        chain.names.append(name)
        chain.middlewares.append(mw)

    for name in names:
        if name == "tracing":
            from middleware.tracing import TracingMiddleware, configure_tracing

            provider = tracer_provider if tracer_provider is not None else configure_tracing(env)
            if provider is not None:
                chain.tracer_provider = provider
                add(name, TracingMiddleware(tracer_provider=provider))
        elif name == "logging":
            from middleware.logging import LoggingMiddleware

            add(
                name,
                LoggingMiddleware(
                    level=settings.handler_log_level, json=settings.log_json, partitions=settings.partitions
                ),
            )
        elif name == "metrics" and metrics is not None:
            add(name, metrics)
        elif name == "partitioning":
            owned = settings.owned_partitions
            if settings.redis_url and len(owned) < settings.partitions:
                from middleware.partitioning import PartitioningMiddleware

                add(
                    name,
                    PartitioningMiddleware(
                        partitions=settings.partitions,
                        owned=owned,
                        on_reroute=metrics.record_reroute if metrics is not None else None,
                    ),
                )
        elif name == "dead_letter":
            from middleware.dead_letter import DeadLetterMiddleware

            options: dict[str, Any] = {}
            if metrics is not None:
                options["on_dead_letter"] = metrics.record_dead_letter
            add(name, DeadLetterMiddleware(**options))
        elif name == "circuit_breaker":
            from middleware.circuit_breaker import CircuitBreakerMiddleware

            key: Callable[[EventContext], str] | None = (
                _per_subject if settings.circuit_key == "subject" else None
            )
            add(
                name,
                CircuitBreakerMiddleware(
                    failure_threshold=settings.circuit_failures,
                    open_seconds=settings.circuit_open_seconds,
                    key=key,
                    on_state_change=(
                        (lambda k, old, new: metrics.record_circuit_state(k, new))
                        if metrics is not None
                        else None
                    ),
                ),
            )
        elif name == "retry":
            from middleware.retry import RetryMiddleware

            add(
                name,
                RetryMiddleware(
                    max_attempts_cap=settings.retry_max_attempts,
                    default_backoff=settings.retry_backoff,
                    default_cap=settings.retry_cap,
                ),
            )
        elif name == "timeout":
            from middleware.timeout import TimeoutMiddleware

            add(name, TimeoutMiddleware(default=settings.handler_timeout))
    return chain
