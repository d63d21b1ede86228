"""The built-in middleware by name: which there are, in which order ``krules run`` installs them,
and how each is built from the settings.  This is the one place that says so.

``KRULES_MIDDLEWARE`` picks among them: ``default`` (all), ``none``, or a comma-separated list of
names (``logging,metrics,dead_letter``); the chain keeps this order whatever the list's order is::

    tracing -> logging -> metrics -> partitioning -> dead_letter -> circuit_breaker -> retry
        -> timeout -> handler

Why this order: a span covers everything (tracing); logging and metrics see the final outcome of a
call and its attempts; the ownership guard re-routes before anything else is recorded for a
subject owned elsewhere; dead_letter catches what finally fails, including an open circuit; the
breaker counts one failure per event whose retries ran out; retry wraps each timed attempt.

Each built-in is the module ``middleware.<name>``, imported only when it is built (an instance that
does not trace never loads OpenTelemetry's SDK); its ``from_settings(build)`` returns the middleware
configured from its own settings, or None to leave it out (costs nothing):

=============== =================================================================================
tracing         on when ``OTEL_TRACES_EXPORTER`` is ``otlp`` or ``console``
                (:func:`middleware.tracing_setup.configure_tracing`); without an exporter there is
                nothing to record, and it is left out (the engine still passes an incoming
                ``traceparent``/``tracestate`` on to the events a handler emits)
logging         ``KRULES_HANDLER_LOG_LEVEL`` (INFO), ``KRULES_LOG_JSON``; one line per handler call
metrics         served at ``/metrics`` on the instance's HTTP port
partitioning    Redis mode, when this instance owns only some of the partitions
dead_letter     dead-letter subjects ``dlq-<id>`` and ``error.handler_failed`` events;
                ``KRULES_MAX_DEAD_LETTERS`` (10,000 embedded, no limit in Redis mode)
circuit_breaker ``KRULES_CIRCUIT_FAILURES`` (5), ``KRULES_CIRCUIT_OPEN_SECONDS`` (30),
                ``KRULES_CIRCUIT_KEY`` (``handler`` or ``subject``: one circuit per handler and subject)
retry           for rules marked ``@retry(on=...)``; ``KRULES_RETRY_MAX_ATTEMPTS`` caps what a rule
                asks, ``KRULES_RETRY_BACKOFF`` / ``KRULES_RETRY_CAP`` are the defaults of a mark
timeout         for rules marked ``@timeout(s)``; ``KRULES_HANDLER_TIMEOUT`` limits every other rule
=============== =================================================================================

A bad value stops start-up with one sentence: :data:`MIDDLEWARE_SETTINGS` are the built-ins'
``KRULES_*`` settings, for ``Settings.from_env(extra=MIDDLEWARE_SETTINGS)`` to know and check them
with the engine's; the middleware validate what they are given again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Final, Protocol, cast

from krules.config import EnvSettings, setting
from krules.errors import ConfigurationError
from middleware.base import Middleware
from middleware.circuit_breaker import CircuitBreakerSettings
from middleware.dead_letter import DeadLetterSettings
from middleware.logging import LoggingSettings
from middleware.retry import RetrySettings
from middleware.timeout import TimeoutSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from krules.config import Settings
    from middleware.metrics import MetricsMiddleware
    from middleware.tracing import TracingMiddleware

__all__ = [
    "BUILT_INS",
    "MIDDLEWARE_SETTINGS",
    "ChainBuild",
    "ChainSettings",
    "DefaultChain",
    "build_default_chain",
    "parse_middleware_names",
]

BUILT_INS: Final = (
    "tracing",
    "logging",
    "metrics",
    "partitioning",
    "dead_letter",
    "circuit_breaker",
    "retry",
    "timeout",
)
"""The built-ins' names, in their default order (first is outermost)."""


def parse_middleware_names(spec: str, var: str = "KRULES_MIDDLEWARE") -> tuple[str, ...]:
    """The built-ins ``spec`` names, in chain order; ConfigurationError for an unknown name."""
    text = spec.strip().lower()
    if text in {"", "default", "all"}:
        return BUILT_INS
    if text == "none":
        return ()
    wanted = {name.strip().replace("-", "_") for name in text.split(",") if name.strip()}
    unknown = sorted(wanted.difference(BUILT_INS))
    if unknown:
        raise ConfigurationError(
            f"{var}={spec!r} names unknown middleware {', '.join(map(repr, unknown))}; choose among "
            f"{', '.join(BUILT_INS)}, or 'default' / 'none'."
        )
    return tuple(name for name in BUILT_INS if name in wanted)


def _names(var: str, raw: str) -> tuple[str, ...]:
    return parse_middleware_names(raw, var)


@dataclass(frozen=True, slots=True)
class ChainSettings(EnvSettings):
    """``KRULES_MIDDLEWARE``: which built-ins ``krules run`` installs (default: all)."""

    middleware: tuple[str, ...] = setting(BUILT_INS, _names)


MIDDLEWARE_SETTINGS: Final = (
    ChainSettings,
    LoggingSettings,
    DeadLetterSettings,
    CircuitBreakerSettings,
    RetrySettings,
    TimeoutSettings,
)
"""The ``KRULES_*`` settings of the built-ins (pass them to ``Settings.from_env(extra=...)``)."""


@dataclass
class ChainBuild:
    """One default chain being built: what its built-ins are built from, and those built so far."""

    settings: Settings
    """The engine's (the partitions, Redis mode, the log format)."""
    env: Mapping[str, str]
    """Where each built-in reads its own ``KRULES_*`` settings, and tracing its ``OTEL_*``."""
    metrics_registry: CollectorRegistry | None = None
    """Where the metrics middleware registers its metrics (default: a registry of its own)."""
    tracer_provider: TracerProvider | None = None
    """Where the spans go; None: the provider the ``OTEL_*`` variables configure, if any."""
    built: dict[str, Middleware] = field(default_factory=dict)
    """The built-ins built so far, by name, in chain order."""

    @property
    def metrics(self) -> MetricsMiddleware | None:
        """The metrics middleware, when it is on: the built-ins after it report to it."""
        return cast("MetricsMiddleware | None", self.built.get("metrics"))


class _BuiltIn(Protocol):
    # What the module of a built-in provides.
    def from_settings(self, build: ChainBuild) -> Middleware | None: ...


@dataclass
class DefaultChain:
    """The middleware to install, outermost first, and the parts an instance wires elsewhere."""

    middlewares: list[Middleware] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    metrics: MetricsMiddleware | None = None
    """Serve ``metrics_route(metrics)``; ``metrics.observe(engine)`` counts the engine's events."""
    tracer_provider: TracerProvider | None = None
    """Shut it down when the instance stops (flushes the spans)."""


def build_default_chain(
    settings: Settings,
    *,
    env: Mapping[str, str] | None = None,
    metrics_registry: CollectorRegistry | None = None,
    tracer_provider: TracerProvider | None = None,
) -> DefaultChain:
    """Build the built-ins ``KRULES_MIDDLEWARE`` names, each configured from ``env`` (default: the
    process environment) and the engine's ``settings``."""
    build = ChainBuild(
        settings,
        os.environ if env is None else env,
        metrics_registry=metrics_registry,
        tracer_provider=tracer_provider,
    )
    for name in ChainSettings.from_env(build.env).middleware:
        module = cast(_BuiltIn, import_module(f"middleware.{name}"))
        mw = module.from_settings(build)
        if mw is not None:
            build.built[name] = mw
    tracing = cast("TracingMiddleware | None", build.built.get("tracing"))
    return DefaultChain(
        middlewares=list(build.built.values()),
        names=list(build.built),
        metrics=build.metrics,
        tracer_provider=None if tracing is None else cast("TracerProvider", tracing.tracer_provider),
    )
