"""The partitioning middleware: handlers run only for subjects of partitions this instance owns.

In Redis mode each instance owns some partitions (``KRULES_PARTITION_ID``); a subject belongs to
``crc32(utf8(name)) % KRULES_PARTITIONS`` (:mod:`krules.partitioning`).  Events normally reach the
owner through its partition's stream, but an event can still be dispatched here for a subject owned
elsewhere, e.g. the property-change event of a write to another partition's subject.  Then this
guard does not run the handler: it re-routes the event to its owner's stream (once per event, when
the turn commits, like any cross-partition emit) and ends the call with :class:`SkipEvent`, which is
not a failure.  Each re-route is reported to ``on_reroute(partition)`` (metrics).

Without a transport (embedded mode) there is nowhere to re-route to, and with every partition owned
there is nothing to guard: ``krules run`` installs this middleware only in Redis mode when the
instance owns part of the partitions, so it costs nothing otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from krules.errors import ConfigurationError
from krules.partitioning import partition_of
from middleware.base import Next, SkipEvent

if TYPE_CHECKING:
    from krules.context import EventContext
    from middleware.registry import ChainBuild

__all__ = ["PartitioningMiddleware", "from_settings"]

logger = logging.getLogger(__name__)


class PartitioningMiddleware:
    """Refuse handler calls for subjects of partitions not owned here; re-route their events."""

    def __init__(
        self,
        *,
        partitions: int,
        owned: Iterable[int],
        on_reroute: Callable[[int], None] | None = None,
    ) -> None:
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ConfigurationError(
                f"PartitioningMiddleware option partitions={partitions!r} is invalid; give the "
                "partition count (KRULES_PARTITIONS), a positive integer."
            )
        owned_set = frozenset(owned)
        bad = sorted(p for p in owned_set if not isinstance(p, int) or not 0 <= p < partitions)
        if bad or not owned_set:
            raise ConfigurationError(
                f"PartitioningMiddleware option owned={sorted(owned_set)!r} is invalid; give one or more "
                f"partition ids between 0 and {partitions - 1}."
            )
        self.partitions = partitions
        self.owned = owned_set
        self._on_reroute = on_reroute

    async def __call__(self, ctx: EventContext, next: Next) -> None:
        name = ctx.subject.name
        partition = partition_of(name, self.partitions)
        if partition in self.owned or ctx._engine.transport is None:
            await next()
            return
        event = ctx.raw_event
        outbox = ctx.turn.outbox
        if not any(queued is event for queued in outbox):  # once per event, however many handlers
            outbox.append(event)
            logger.info(
                "%s for subject %r belongs to partition %d, not owned here; re-routed to its stream",
                event.type,
                name,
                partition,
            )
            if self._on_reroute is not None:
                try:
                    self._on_reroute(partition)
                except Exception:
                    logger.exception("reporting a re-route failed")
        raise SkipEvent


def from_settings(build: ChainBuild) -> PartitioningMiddleware | None:
    """The guard ``krules run`` installs in Redis mode when this instance asks for only some of the
    partitions by id (None otherwise: nothing to guard, nowhere to re-route to, or ``auto``, where
    the engine itself sends a cascade that reaches another partition to that partition's stream)."""
    settings = build.settings
    owned = settings.static_partitions
    if not settings.redis_url or owned is None or len(owned) >= settings.partition_count:
        return None
    metrics = build.metrics
    return PartitioningMiddleware(
        partitions=settings.partition_count,
        owned=owned,
        on_reroute=None if metrics is None else metrics.record_reroute,
    )
