"""Metrics middleware: Prometheus counters, a duration histogram and gauges, served at ``/metrics``.

:class:`MetricsMiddleware` keeps its metrics in its own
:class:`~prometheus_client.CollectorRegistry` (never the process-wide default one, so several apps
and tests never collide); ``registry=`` injects one.  Metrics:

- ``krules_events_received_total{type}``: every event the engine dispatches, root events and every
  event of their cascades alike (:meth:`MetricsMiddleware.observe`).  Senders choose event types,
  so the label is bounded by the rules, not by them (:func:`event_label`): a type some rule
  subscribes to exactly, or one of the engine's own, is its own label; a type only a glob rule
  matches is labelled with that glob (``order.*``); any other type is ``other``.  Counting for an
  engine not given to :meth:`~MetricsMiddleware.observe` (``observe_event`` appended to its
  observers by hand), the first ``max_event_types`` types are their own labels, later ones
  ``other``.
- ``krules_handler_calls_total{handler,outcome}``: handler calls by outcome, ``ok``, ``skipped``
  (:class:`~middleware.base.SkipEvent`), ``failed`` (any other exception) or ``dead_lettered``
  (:class:`~middleware.base.DeadLetterEvent`).  A cancelled call is not counted.
- ``krules_handler_duration_seconds{handler}``: histogram of handler call durations, buckets
  from 0.5 ms to 10 s (:data:`DURATION_BUCKETS`).
- ``krules_handler_retries_total{handler}``: retries, i.e. :data:`~middleware.base.ATTEMPTS` - 1
  when a retry middleware inside this one recorded the attempts.
- ``krules_dead_letters_total{handler,reason}``: :meth:`MetricsMiddleware.record_dead_letter`.
- ``krules_dead_letters_dropped_total``: the oldest dead letters deleted to keep
  ``KRULES_MAX_DEAD_LETTERS`` (:meth:`MetricsMiddleware.record_dead_letters_dropped`).
- ``krules_circuit_state{key}``: 0 closed, 1 half-open, 2 open
  (:meth:`MetricsMiddleware.record_circuit_state`).
- ``krules_partition_lag{partition}`` and ``krules_partition_pending{partition}``:
  :meth:`MetricsMiddleware.record_partition_lag` and :meth:`MetricsMiddleware.record_partition_pending`.
- ``krules_stream_length{partition}`` and ``krules_stream_trimmed_total{partition}``: a partition
  stream's length after each upkeep's trimming, and the entries trimmed
  (:meth:`MetricsMiddleware.record_stream_length`, :meth:`MetricsMiddleware.record_stream_trimmed`).
- ``krules_rerouted_total{partition}``: events the partitioning middleware sent to their owner's
  partition (:meth:`MetricsMiddleware.record_reroute`).
- ``krules_partitions_owned``: the partitions this instance owns and reads, set at each handover
  (:meth:`MetricsMiddleware.record_partitions_owned`); summed over a deployment's instances, the
  partitions being processed.
- ``krules_partition_handovers_total{direction}``: partitions this instance took (``acquired``) or
  handed back after their turns committed (``released``), :meth:`MetricsMiddleware.record_handover`.
- ``krules_partition_leases_lost_total``: partition leases this instance lost (expired before it
  renewed them, e.g. paused or cut off from Redis, or found taken): the turns it had under way for
  those partitions were not committed and their new owner runs them
  (:meth:`MetricsMiddleware.record_lease_lost`).
- ``krules_timers_pending{partition}``: timers pending in an owned partition, at each upkeep
  (:meth:`MetricsMiddleware.record_timers_pending`).
- ``krules_timer_lag_seconds``: histogram of timer firing lags, from a timer's due time to the start
  of its turn, buckets from 5 ms to 60 s (:meth:`MetricsMiddleware.record_timer_lag`).

Register it before (outside) the retry middleware: it then counts one call per event and handler,
with the final attempt count; inside it, every attempt would count as a call and the retries
counter would overcount.

Options (keyword-only): ``registry``, the :class:`~prometheus_client.CollectorRegistry` to register
the metrics in (default: a new one); ``max_event_types`` (default 100), the cap on ``type`` labels
when counting without the rules; anything else raises :class:`~krules.errors.ConfigurationError`.

:func:`metrics_route` serves a registry in the Prometheus text format as a Starlette route, to pass
to ``krules.http.server.serve_in_background(engine, routes=[...])`` or ``krules.http.server.run``
(routes passed there are behind ``KRULES_INGRESS_TOKEN`` when it is set, as the ingress is).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from fnmatch import fnmatchcase
from time import perf_counter, time
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from krules.dead_letters.record import HANDLER_FAILED
from krules.errors import ConfigurationError
from krules.event_types import SUBJECT_DELETED, SUBJECT_PROPERTY_CHANGED, SUBJECT_PROPERTY_DELETED
from middleware._hot_metrics import HotCollector
from middleware.base import ATTEMPTS, CANCELLED, Observer, outcome_of

if TYPE_CHECKING:
    from krules.context import EventContext
    from krules.engine import Engine
    from krules.events import Event
    from krules.rules import Rule, RuleRegistry
    from middleware.registry import ChainBuild

__all__ = [
    "CIRCUIT_STATES",
    "DURATION_BUCKETS",
    "ENGINE_EVENT_TYPES",
    "HANDOVER_DIRECTIONS",
    "OTHER_EVENT_TYPE",
    "MetricsMiddleware",
    "event_label",
    "from_settings",
    "metrics_route",
]

DURATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of the handler duration histogram's buckets (``+Inf`` is added)."""

CIRCUIT_STATES: Final = {"closed": 0, "half-open": 1, "half_open": 1, "open": 2}
"""Circuit breaker state -> value of the ``krules_circuit_state`` gauge."""

HANDOVER_DIRECTIONS: Final = ("acquired", "released")
TIMER_LAG_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""The ``direction`` labels of ``krules_partition_handovers_total``."""

OTHER_EVENT_TYPE: Final = "other"
"""The ``type`` label of the events whose type no rule subscribes to."""
ENGINE_EVENT_TYPES: Final = frozenset(
    {SUBJECT_PROPERTY_CHANGED, SUBJECT_PROPERTY_DELETED, SUBJECT_DELETED, HANDLER_FAILED}
)
"""The engine's own event types: always their own ``type`` label."""

_LABELS_CACHED: Final = 4096  # event type -> label, remembered; cleared when full


def event_label(event_type: str, rules: Sequence[Rule]) -> str:
    """The ``type`` label of an event of ``event_type`` that ``rules`` match (the registry's
    ``match``): the type when a rule names it exactly, else the first matching glob, else ``other``."""
    if not rules:
        return OTHER_EVENT_TYPE
    for rule in rules:
        if event_type in rule.patterns:
            return event_type
    for rule in rules:
        for pattern in rule.patterns:
            if fnmatchcase(event_type, pattern):
                return pattern
    return OTHER_EVENT_TYPE


class MetricsMiddleware(Observer):
    """Count and time every handler call in Prometheus metrics of its own registry."""

    def __init__(self, *, registry: CollectorRegistry | None = None, max_event_types: int = 100) -> None:
        if isinstance(max_event_types, bool) or not isinstance(max_event_types, int) or max_event_types < 1:
            raise ConfigurationError(
                f"MetricsMiddleware option max_event_types={max_event_types!r} is invalid; pass a "
                "positive number of event types to label before the rest count as 'other'."
            )
        self._max_event_types = max_event_types
        self._rules: RuleRegistry | None = None
        self._labels: dict[str, str] = {}
        if registry is None:
            registry = CollectorRegistry()
        elif not isinstance(registry, CollectorRegistry):
            raise ConfigurationError(
                f"MetricsMiddleware option registry={registry!r} is invalid; "
                "pass a prometheus_client.CollectorRegistry or leave it out for a new one."
            )
        self.registry = registry
        """Where the metrics are registered (serve it with :func:`metrics_route`)."""
        self._hot = HotCollector(DURATION_BUCKETS)  # the per-call metrics, as plain numbers
        try:
            registry.register(self._hot)
            self.dead_letters = Counter(
                "krules_dead_letters", "Events dead-lettered", ["handler", "reason"], registry=registry
            )
            self.dead_letters_dropped = Counter(
                "krules_dead_letters_dropped",
                "Oldest dead letters deleted to keep KRULES_MAX_DEAD_LETTERS",
                registry=registry,
            )
            self.circuit_state = Gauge(
                "krules_circuit_state",
                "Circuit state: 0 closed, 1 half-open, 2 open",
                ["key"],
                registry=registry,
            )
            self.partition_lag = Gauge(
                "krules_partition_lag",
                "Events not yet delivered (consumer group lag), per partition",
                ["partition"],
                registry=registry,
            )
            self.partition_pending = Gauge(
                "krules_partition_pending",
                "Events delivered but not yet acknowledged, per partition",
                ["partition"],
                registry=registry,
            )
            self.stream_length = Gauge(
                "krules_stream_length",
                "Entries in a partition stream after trimming, per partition",
                ["partition"],
                registry=registry,
            )
            self.stream_trimmed = Counter(
                "krules_stream_trimmed",
                "Processed entries trimmed from a partition stream, per partition",
                ["partition"],
                registry=registry,
            )
            self.rerouted = Counter(
                "krules_rerouted",
                "Events re-routed to the partition that owns their subject",
                ["partition"],
                registry=registry,
            )
            self.partitions_owned = Gauge(
                "krules_partitions_owned",
                "Partitions this instance owns and reads",
                registry=registry,
            )
            self.partition_handovers = Counter(
                "krules_partition_handovers",
                "Partitions this instance took (acquired) or handed back (released)",
                ["direction"],
                registry=registry,
            )
            self.partition_leases_lost = Counter(
                "krules_partition_leases_lost",
                "Partition leases this instance lost (expired or taken) instead of handing them back",
                registry=registry,
            )
            self.timers_pending = Gauge(
                "krules_timers_pending",
                "Timers pending in a partition this instance owns, per partition",
                ["partition"],
                registry=registry,
            )
            self.timer_lag = Histogram(
                "krules_timer_lag_seconds",
                "Seconds from a timer's due time to the start of its turn",
                buckets=TIMER_LAG_BUCKETS,
                registry=registry,
            )
        except ValueError as exc:  # "Duplicated timeseries in CollectorRegistry"
            raise ConfigurationError(
                f"MetricsMiddleware option registry={registry!r} already holds krules metrics ({exc}); "
                "give each MetricsMiddleware its own registry."
            ) from None
        for direction in HANDOVER_DIRECTIONS:  # both series exist from the start, at 0
            self.partition_handovers.labels(direction)

    def enter(self, ctx: EventContext) -> float:
        """The start time."""
        return perf_counter()

    def exit(self, ctx: EventContext, start: float, error: BaseException | None) -> None:
        """Count the outcome, duration and retries (a cancelled call is not counted)."""
        handlers = self._hot.handlers
        name = ctx.rule.name
        tally = handlers.get(name)
        if tally is None:
            tally = self._hot.tally(name)
        if error is None:
            tally.ok += 1
        else:
            outcome = outcome_of(error)
            if outcome == CANCELLED:
                return
            setattr(tally, outcome, getattr(tally, outcome) + 1)  # a counter per outcome, named after it
        seconds = perf_counter() - start
        tally.duration_sum += seconds
        tally.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        attempts = ctx.get_metadata(ATTEMPTS)
        if attempts.__class__ is int and attempts > 1:
            tally.retries += attempts - 1

    def observe(self, engine: Engine) -> None:
        """Count every event ``engine`` dispatches, labelled by type as its rules allow (see the
        module docstring): :meth:`observe_event` becomes one of its ``event_observers``."""
        self._rules = engine.registry
        self._labels.clear()
        engine.event_observers.append(self.observe_event)

    def observe_event(self, event: Event) -> None:
        """Count a dispatched event by its ``type`` label (:meth:`observe` appends this to an engine)."""
        label = self._labels.get(event.type)
        if label is None:
            label = self._label(event.type)
        events = self._hot.events
        try:
            events[label] += 1
        except KeyError:
            events[label] = 1
            self._hot.events_created[label] = time()

    def _label(self, event_type: str) -> str:
        rules = self._rules
        if event_type in ENGINE_EVENT_TYPES:
            label = event_type
        elif rules is not None:
            label = event_label(event_type, rules.match(event_type))
        elif event_type in self._hot.events or len(self._hot.events) < self._max_event_types:
            label = event_type
        else:
            label = OTHER_EVENT_TYPE
        labels = self._labels
        if len(labels) >= _LABELS_CACHED:
            labels.clear()  # an unbounded vocabulary of types must not grow memory forever
        labels[event_type] = label
        return label

    def record_dead_letter(self, handler: str, reason: str) -> None:
        """Count an event dead-lettered for ``handler`` with ``reason`` (e.g. ``circuit_open``)."""
        self.dead_letters.labels(handler, reason).inc()

    def record_dead_letters_dropped(self, count: int) -> None:
        """Count ``count`` old dead letters deleted to keep the cap on stored dead letters."""
        self.dead_letters_dropped.inc(count)

    def record_circuit_state(self, key: str, state: str) -> None:
        """Set the circuit ``key``'s gauge from ``state``: ``closed``, ``half-open`` or ``open``."""
        value = CIRCUIT_STATES.get(state)
        if value is None:
            raise ValueError(
                f"Circuit state {state!r} of circuit {key!r} is unknown; use 'closed', 'half-open' or 'open'."
            )
        self.circuit_state.labels(key).set(value)

    def record_partition_lag(self, partition: int, lag: int) -> None:
        """Set how many events of ``partition`` are not yet delivered (its consumer-group lag)."""
        self.partition_lag.labels(str(partition)).set(lag)

    def record_partition_pending(self, partition: int, pending: int) -> None:
        """Set how many events of ``partition`` were delivered but are not acknowledged yet."""
        self.partition_pending.labels(str(partition)).set(pending)

    def record_stream_length(self, partition: int, length: int) -> None:
        """Set how many entries ``partition``'s stream holds after trimming."""
        self.stream_length.labels(str(partition)).set(length)

    def record_stream_trimmed(self, partition: int, entries: int) -> None:
        """Count ``entries`` trimmed from ``partition``'s stream (all of them processed)."""
        self.stream_trimmed.labels(str(partition)).inc(entries)

    def record_reroute(self, partition: int) -> None:
        """Count an event re-routed to ``partition``, which owns its subject."""
        self.rerouted.labels(str(partition)).inc()

    def record_partitions_owned(self, count: int) -> None:
        """Set how many partitions this instance owns and reads."""
        self.partitions_owned.set(count)

    def record_handover(self, direction: str) -> None:
        """Count a partition taken (``acquired``) or handed back (``released``) by this instance."""
        if direction not in HANDOVER_DIRECTIONS:
            raise ValueError(
                f"Partition handover direction {direction!r} is unknown; use 'acquired' or 'released'."
            )
        self.partition_handovers.labels(direction).inc()

    def record_lease_lost(self) -> None:
        """Count a partition lease this instance lost (it did not hand the partition back)."""
        self.partition_leases_lost.inc()

    def record_timers_pending(self, partition: int, timers: int) -> None:
        """Set the timers pending in ``partition``."""
        self.timers_pending.labels(str(partition)).set(timers)

    def record_timer_lag(self, seconds: float) -> None:
        """Observe a timer's firing lag: from its due time to the start of its turn."""
        self.timer_lag.observe(max(0.0, seconds))

    def __repr__(self) -> str:
        return f"MetricsMiddleware(handlers={len(self._hot.handlers)})"


def metrics_route(source: MetricsMiddleware | CollectorRegistry, path: str = "/metrics") -> Route:
    """A ``GET path`` route serving ``source``'s registry in the Prometheus text exposition format."""
    registry = source.registry if isinstance(source, MetricsMiddleware) else source
    if not isinstance(registry, CollectorRegistry):
        raise ConfigurationError(
            f"metrics_route got {source!r}; pass a MetricsMiddleware or a CollectorRegistry."
        )
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigurationError(
            f"metrics_route option path={path!r} is invalid; pass a path such as '/metrics'."
        )

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Route(path, metrics, methods=["GET"], name="metrics")


def from_settings(build: ChainBuild) -> MetricsMiddleware:
    """The metrics middleware ``krules run`` installs (in ``build.metrics_registry``, if given): the
    built-ins after it in the chain report their dead letters, circuit states and re-routes to it."""
    return MetricsMiddleware(registry=build.metrics_registry)
