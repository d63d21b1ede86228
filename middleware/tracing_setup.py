"""The OpenTelemetry SDK ``TracerProvider`` that tracing reports to, configured from ``OTEL_*``.

:func:`configure_tracing` builds an SDK ``TracerProvider`` from the standard environment variables
(read from the mapping it is given):

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
(``OTEL_BSP_*``) are read from the process environment by the OpenTelemetry SDK itself.  Wiring by
hand (``krules run`` does it with :func:`middleware.tracing.from_settings`)::

    provider = configure_tracing(os.environ)
    if provider is not None:                       # None: tracing off, or set up by someone else
        trace.set_tracer_provider(provider)        # (e.g. opentelemetry-instrument); user code and
    tracing = TracingMiddleware()                  # HTTP clients join the spans of the global one
    container.middlewares.override(providers.Object([tracing, ...]))   # outermost: spans cover the rest
    ...
    if provider is not None:
        provider.shutdown()                        # at exit: flush the spans still batched

Nothing of the SDK is imported until a provider is built: an instance that does not trace never
loads it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from krules.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

__all__ = ["DEFAULT_SERVICE_NAME", "EXPORTERS", "configure_tracing"]

DEFAULT_SERVICE_NAME: Final = "krules"
"""The tracer's name and the ``service.name`` used when none is configured."""

EXPORTERS: Final = ("otlp", "console", "none")
"""The values ``OTEL_TRACES_EXPORTER`` accepts (comma-separated)."""

_DEFAULT_OTLP_ENDPOINT: Final = "http://localhost:4318"

_SAMPLERS: Final = (
    "always_on",
    "always_off",
    "parentbased_always_on",
    "parentbased_always_off",
    "traceidratio",
    "parentbased_traceidratio",
)


def configure_tracing(env: Mapping[str, str]) -> SDKTracerProvider | None:
    """An SDK ``TracerProvider`` built from the OpenTelemetry variables in ``env``, or None for no tracing.

    See the module docstring for the variables.  Real exporters sit behind a ``BatchSpanProcessor``
    (spans are exported from a background thread, never on the event loop).  The caller owns the
    provider: pass it to :class:`~middleware.tracing.TracingMiddleware` (and usually
    ``trace.set_tracer_provider``), and call its ``shutdown()`` at exit to flush.  Raises
    ConfigurationError for unknown values.
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
