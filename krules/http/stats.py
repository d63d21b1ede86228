"""What the HTTP server bounds, as plain counters, the Prometheus collector that exports them, and
a log line at most once per interval for what recurs.

The ingress and the connection guard (:mod:`krules.http.connections`) count into one
:class:`ServerStats` (plain integers: counting costs a request nothing); :class:`ServerCollector`
turns them into metric families when ``/metrics`` is scraped, next to the engine's queued turns:

- ``krules_ingress_refused_total{reason}``: requests refused with 503 before anything of them was
  accepted: ``queued_turns`` (``KRULES_MAX_QUEUED_TURNS``), ``queued_bytes``
  (``KRULES_INGRESS_MAX_QUEUED_BYTES``), ``stream_backlog`` (``KRULES_MAX_STREAM_BACKLOG``).
- ``krules_ingress_queued_bytes``: request bytes accepted and not yet answered.
- ``krules_turns_queued``: root turns waiting for their subject or a slot.
- ``krules_http_connections``: connections open; ``krules_http_connections_refused_total``:
  connections refused over ``KRULES_HTTP_MAX_CONNECTIONS``.
- ``krules_http_timeouts_total{kind}``: connections closed for taking too long: ``header``
  (``KRULES_HTTP_HEADER_TIMEOUT``), ``idle`` (``KRULES_HTTP_IDLE_TIMEOUT``), ``body``
  (``KRULES_HTTP_BODY_TIMEOUT``, answered 408).
- ``krules_http_accept_errors_total``: connections the operating system could not hand over (out of
  file descriptors), logged once per interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from krules.engine import Engine

__all__ = ["REFUSAL_REASONS", "TIMEOUT_KINDS", "LogEvery", "ServerCollector", "ServerStats"]

REFUSAL_REASONS = ("queued_turns", "queued_bytes", "stream_backlog")
"""Why the ingress refuses a request before accepting it (the ``reason`` label)."""

TIMEOUT_KINDS = ("header", "idle", "body")
"""Which deadline a connection missed (the ``kind`` label)."""


class ServerStats:
    """The server's counters (see the module docstring); one per served ingress."""

    __slots__ = ("accept_errors", "connections", "connections_refused", "queued_bytes", "refused", "timeouts")

    def __init__(self) -> None:
        self.connections = 0
        """Connections open now."""
        self.connections_refused = 0
        """Connections refused because ``KRULES_HTTP_MAX_CONNECTIONS`` were open."""
        self.timeouts = dict.fromkeys(TIMEOUT_KINDS, 0)
        """Connections closed by a deadline, by kind."""
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        """Requests refused before anything of them was accepted, by reason."""
        self.queued_bytes = 0
        """Request bytes accepted and not answered yet."""
        self.accept_errors = 0
        """Failed accepts (the process is out of file descriptors, or the system of memory)."""


class ServerCollector(Collector):
    """Exports a :class:`ServerStats` (and ``engine``'s queued turns) at scrape time."""

    def __init__(self, stats: ServerStats, engine: Engine) -> None:
        self.stats = stats
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        refused = CounterMetricFamily(
            "krules_ingress_refused",
            "Requests refused with 503 before any of their events was accepted, by bound reached",
            labels=["reason"],
        )
        for reason, count in stats.refused.items():
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily(
            "krules_ingress_queued_bytes",
            "Request bytes accepted by the ingress and not yet answered",
            value=stats.queued_bytes,
        )
        yield GaugeMetricFamily(
            "krules_turns_queued", "Root turns waiting for their subject or a slot", value=self.engine.queued
        )
        yield GaugeMetricFamily("krules_http_connections", "HTTP connections open", value=stats.connections)
        yield CounterMetricFamily(
            "krules_http_connections_refused",
            "HTTP connections refused because KRULES_HTTP_MAX_CONNECTIONS were open",
            value=stats.connections_refused,
        )
        timeouts = CounterMetricFamily(
            "krules_http_timeouts", "HTTP connections closed for missing a deadline, by kind", labels=["kind"]
        )
        for kind, count in stats.timeouts.items():
            timeouts.add_metric([kind], count)
        yield timeouts
        yield CounterMetricFamily(
            "krules_http_accept_errors",
            "Connections the system could not hand over (out of file descriptors or memory)",
            value=stats.accept_errors,
        )


class LogEvery:
    """Log a recurring condition at most once per ``interval`` seconds, saying how often it recurred
    in between, so a flood of the same failure (refused requests, failed accepts) is a line per
    interval instead of a line per occurrence."""

    __slots__ = ("_logger", "_next", "_unlogged", "interval")

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._logger = logger
        self.interval = interval
        self._next = 0.0
        self._unlogged = 0

    def log(self, level: int, message: str, *args: object, exc_info: BaseException | None = None) -> bool:
        """Log ``message % args`` unless a line was logged less than ``interval`` ago; True if logged."""
        now = time.monotonic()
        if now < self._next:
            self._unlogged += 1
            return False
        if self._unlogged:
            message += " (%d more like it since the last such line, logged at most every %g s)"
            args = (*args, self._unlogged, self.interval)
        self._unlogged = 0
        self._next = now + self.interval
        self._logger.log(level, message, *args, exc_info=exc_info)
        return True
