"""The built-in middleware by name, in their default order (first is outermost).

``KRULES_MIDDLEWARE`` picks among them: ``default`` (all), ``none``, or a comma-separated list of
names (``logging,metrics,dead_letter``); the chain keeps this order whatever the list's order is::

    tracing -> logging -> metrics -> partitioning -> dead_letter -> circuit_breaker -> retry
        -> timeout -> handler

Why this order: a span covers everything (tracing); logging and metrics see the final outcome of a
call and its attempts; the ownership guard re-routes before anything else is recorded for a
subject owned elsewhere; dead_letter catches what finally fails, including an open circuit; the
breaker counts one failure per event whose retries ran out; retry wraps each timed attempt.
"""

from __future__ import annotations

from typing import Final

from krules.errors import ConfigurationError

__all__ = ["BUILT_INS", "parse_middleware_names"]

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
