"""The partition worker: reads the streams of the partitions an instance owns and runs their turns.

One reading loop takes entries in batches (``KRULES_STREAM_BATCH``) and starts a turn for each,
in stream order: the engine keeps one subject's turns in that order and runs different subjects
concurrently up to ``KRULES_MAX_CONCURRENT_TURNS``; the loop reads ahead at most that many entries.
Each turn ends in a commit that stores its writes, marks its event processed and acknowledges its
entry at once (see :class:`krules.turn.Turn`), so a crash at any point leaves the entry pending and
nothing of it stored, or everything stored and the entry gone.

Before a turn, an entry is checked: one that is not a valid event, whatever is wrong with it
(:mod:`krules.transport.base` decodes strictly and never raises), is dead-lettered
(``invalid_event``); one delivered more than ``KRULES_MAX_DELIVERIES`` times is dead-lettered
(``max_deliveries``) instead of looping; one carrying a ``krules*`` extension other than
``krulesdepth`` and a correctly signed replay is dead-lettered (``reserved_extension``, see
:mod:`krules.dead_letters.signing`); one whose subject belongs to another partition is
forwarded there once (``misrouted`` if it was forwarded already).  A turn that cannot be stored
(Redis away past the storage's retries, in a handler's read or in the commit) is not stored at all
and is run again by the worker, which still owns its entry: for as long as Redis is unreachable,
up to ``KRULES_MAX_DELIVERIES`` times for other storage failures (then the entry stays pending and
is reclaimed later, counting as a delivery).  Any other failure while handling an entry (the entry
itself, or a bug it runs into) is tried again here too, each try counting as a delivery, and after
``KRULES_MAX_DELIVERIES`` the entry is dead-lettered (``max_deliveries``, with the error and its
traceback); if even its event cannot be stored as a dead letter, the entry's fields are.  So no
entry stays pending for ever, and none stops the partition.

The worker's dead letters are dead-letter subjects like the handlers' (:mod:`krules.dead_letters`,
listed by ``krules dlq``), with handler "".  Each is committed like a turn, with the receipt
``entry:<partition>:<entry id>``: the entry's ack, that id marked processed and the dead letter's
writes of the entry's partition in one script; its writes to other partitions (the ``dlq-<id>``
subject and the index usually live elsewhere) are stored just before and are idempotent, so a crash
in between only means the entry is taken again and the same dead letter rewritten.

A timer task moves the owned partitions' due timers into their streams every
``KRULES_TIMER_POLL_MS`` (:mod:`krules.timers`): from there they are entries like any other,
except that the engine runs a timer's turn only while its firing is live (not cancelled or
scheduled again since it was moved, and moved at all: see :meth:`krules.engine.Engine.process`).
A maintenance task reclaims entries left idle longer than ``KRULES_CLAIM_IDLE_MS`` and keeps the
streams trimmed.  Another keeps the partitions (every ``KRULES_LEASE_RENEW_MS``: the source's
``tend``): a partition the source hands back (the share moved to another instance) or lost (its
lease gone) is no longer read; once the turns already started for it are over, it is released.  A
turn whose commit is refused because its partition's lease is gone
(:class:`~krules.errors.LeaseLostError`) is dropped here, not retried nor dead-lettered: the
partition's new owner runs its entry.  :meth:`PartitionWorker.stop` (or cancelling
:meth:`PartitionWorker.run`) stops reading; the turns under way finish and commit, and
:meth:`krules.engine.Engine.close` waits for them (cancelling ``run`` again while they drain, as a
shutdown past its deadline does, cancels them: their entries stay pending, taken again later).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Final

from krules.changes import SubjectChanges
from krules.dead_letters.record import INVALID_EVENT, MAX_DELIVERIES, MISROUTED, RESERVED_EXTENSION
from krules.dead_letters.signing import entry_problem
from krules.dead_letters.store import entry_dead_letter, store_changes
from krules.errors import KRulesError, LeaseLostError, StorageError, StorageUnavailableError
from krules.events import REPLAY_SIGNATURE_EXTENSION
from krules.partitioning import partition_of
from krules.timers import TIMER_EXTENSION, Fired
from krules.transport.base import HOPS_FIELD

if TYPE_CHECKING:
    from krules.engine import Engine
    from krules.transport.base import Delivery, PartitionFigures, PartitionSource

__all__ = ["PartitionWorker"]

logger = logging.getLogger("krules.worker")  # its name before the re-layout, kept for logging configs

_READ_BACKOFF: Final = 0.1
_READ_BACKOFF_CAP: Final = 5.0
_RETRY_BACKOFF: Final = 0.1
_RETRY_CAP: Final = 5.0
_TIMER_BATCH: Final = 500  # due timers one move takes per partition


class PartitionWorker:
    """Feeds an engine from the partitions of a :class:`~krules.transport.base.PartitionSource`."""

    def __init__(self, engine: Engine, source: PartitionSource) -> None:
        settings = engine.settings
        self.engine = engine
        self.source = source
        self.batch = settings.stream_batch
        self.block_ms = settings.stream_block_ms
        self.max_deliveries = settings.max_deliveries
        self.maintain_every = max(0.05, settings.claim_idle_ms / 2000)
        self.timer_every = settings.timer_poll_ms / 1000
        self.max_inflight = max(settings.max_concurrent_turns, settings.stream_batch)
        self._partitions = settings.partition_count
        self._replay_key: str | None = None  # read when a signed replay first arrives
        # (partition, entry id): entry ids are only unique within one stream
        self._inflight: dict[tuple[int, str], asyncio.Future[None]] = {}
        self._room = asyncio.Event()
        self._stopping = False
        self._reading: asyncio.Task[list[Delivery]] | None = None
        self._handing: dict[int, asyncio.Future[None]] = {}  # partitions being handed back
        self.processed = 0
        """Entries handled by this worker (turns committed, duplicates dropped, dead letters)."""
        self.partition_observers: list[Callable[[int, PartitionFigures], None]] = []
        """Called with ``(partition, figures)`` at each upkeep (e.g. to export metrics)."""
        self.timer_lag_observers: list[Callable[[float], object]] = []
        """Called with the seconds from a timer's due time to the start of its turn (its firing lag),
        e.g. ``MetricsMiddleware.record_timer_lag``."""
        self.dead_letter_observers: list[Callable[[str, str], object]] = []
        """Called with ``("", reason)`` for each entry dead-lettered (the handler is "": none ran),
        e.g. ``MetricsMiddleware.record_dead_letter``."""

    async def run(self) -> None:
        """Open the source and process until :meth:`stop` or cancellation (turns under way go on; a
        second cancellation, while they drain, cancels them: their entries stay pending)."""
        await self.source.open()
        logger.info(
            "instance %r reads partition(s) %s",
            getattr(self.source, "consumer", "?"),
            ",".join(map(str, self.source.partitions)) or "none yet",
        )
        upkeep = asyncio.ensure_future(self._maintain())
        moving = (
            asyncio.ensure_future(self._move_timers()) if hasattr(self.source, "move_due_timers") else None
        )
        # The leases are kept while the turns under way drain, so that those can still commit.
        tending = asyncio.ensure_future(self._tend()) if self.source.tend_every else None
        try:
            await self._read_loop()
        finally:
            background = [upkeep, *([moving] if moving is not None else [])]
            for job in background:
                job.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            try:
                await self.drain()
            except asyncio.CancelledError:  # cut short (a shutdown deadline): the turns are abandoned,
                for task in list(self._inflight.values()):  # their entries stay pending
                    task.cancel()
                raise
            finally:
                stopping = [*self._handing.values(), *([tending] if tending is not None else [])]
                for task in stopping:  # closing the source releases what they would have
                    task.cancel()
                await asyncio.gather(*stopping, return_exceptions=True)
                await self.source.close()

    def stop(self) -> None:
        """Stop reading (an entry being read stays pending, for the next run); turns under way go on."""
        self._stopping = True
        if self._reading is not None:
            self._reading.cancel()
        self._room.set()

    async def drain(self) -> None:
        """Wait until the turns started by this worker are over."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight.values()), return_exceptions=True)

    # -- reading -----------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        failures = 0
        while not self._stopping:
            room = self.max_inflight - len(self._inflight)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            self._reading = asyncio.ensure_future(self.source.read(min(self.batch, room), self.block_ms))
            try:
                deliveries = await self._reading
            except asyncio.CancelledError:
                if self._stopping:
                    return
                raise
            except KRulesError as exc:
                failures += 1
                delay = min(_READ_BACKOFF_CAP, _READ_BACKOFF * 2 ** min(failures, 10)) * (
                    0.5 + random.random() / 2
                )
                logger.error("reading the partition streams failed (%s); trying again in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            finally:
                self._reading = None
            failures = 0
            self._start(deliveries)

    def _start(self, deliveries: list[Delivery]) -> None:
        reading = self.source.reading
        for delivery in deliveries:
            key = (delivery.partition, delivery.entry_id)
            if key in self._inflight:
                continue  # re-read or reclaimed while its turn is still running here
            if delivery.fence and not reading(delivery.partition, delivery.fence):
                continue  # handed back or lost while it was read: left pending for the next owner
            self._inflight[key] = asyncio.ensure_future(self._handle(delivery))

    async def _tend(self) -> None:
        """Keep the partitions' leases and take or hand back partitions (see the source's tend)."""
        every = self.source.tend_every or 1.0
        while True:
            await asyncio.sleep(every)
            try:
                handed = await self.source.tend(taking=not self._stopping)
            except KRulesError as exc:
                logger.warning(
                    "renewing the partition leases failed (%s); trying again in %.1f s", exc, every
                )
                continue
            except Exception:  # a bug must not stop the renewals for good (the leases would expire)
                logger.exception("renewing the partition leases failed unexpectedly; trying again")
                continue
            for partition in handed:
                if partition not in self._handing:
                    self._handing[partition] = asyncio.ensure_future(self._hand_back(partition))

    async def _hand_back(self, partition: int) -> None:
        """Let the turns of ``partition`` (no longer read) finish, then release it."""
        try:
            while True:
                turns = [task for (p, _), task in self._inflight.items() if p == partition]
                if not turns:
                    break
                await asyncio.gather(*turns, return_exceptions=True)
            while True:
                try:
                    await self.source.give_back([partition])
                    return
                except KRulesError as exc:
                    logger.warning("releasing partition %d failed (%s); trying again", partition, exc)
                    await asyncio.sleep(self.source.tend_every or 1.0)
        finally:
            del self._handing[partition]

    async def _move_timers(self) -> None:
        """Move the owned partitions' due timers into their streams every ``KRULES_TIMER_POLL_MS``
        (at once again while a partition had more due than one move takes)."""
        move = self.source.move_due_timers  # type: ignore[attr-defined]
        clock = self.engine.clock
        while True:
            await asyncio.sleep(self.timer_every)
            try:
                while await move(clock.now(), _TIMER_BATCH) >= _TIMER_BATCH:
                    pass
            except KRulesError as exc:
                logger.warning("moving due timers failed (%s); trying again", exc)
            except Exception:  # a bug must not stop the timers for good
                logger.exception("moving due timers failed unexpectedly; trying again")

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.maintain_every)
            try:
                figures = await self.source.maintain()
                reclaimed = await self.source.reclaim(list(self._inflight))
            except KRulesError as exc:
                logger.warning("stream upkeep failed (%s); trying again later", exc)
                continue
            for partition, measured in figures.items():
                for observe in self.partition_observers:
                    try:
                        observe(partition, measured)
                    except Exception:
                        logger.exception("a partition observer failed")
            if reclaimed and not self._stopping:
                self._start(reclaimed)

    # -- one entry ---------------------------------------------------------------------------
    async def _handle(self, delivery: Delivery) -> None:
        try:
            failures = 0
            failed: Exception | None = None  # set once the entry is to be parked (max_deliveries)
            while True:
                try:
                    if failed is None:
                        await self._decide(delivery)
                    else:
                        await self._park(delivery, failed)
                    self.processed += 1
                    return
                except LeaseLostError as exc:
                    logger.warning(
                        "entry %s of partition %d was not committed here: %s",
                        delivery.entry_id,
                        delivery.partition,
                        exc,
                    )
                    return
                except StorageError as exc:
                    # Nothing of the turn was stored.  Try it again here, still owning the entry
                    # (a re-read would count as another delivery): forever while Redis is away,
                    # up to KRULES_MAX_DELIVERIES times for other storage failures.
                    failures += 1
                    gone = isinstance(exc, StorageUnavailableError)
                    if self._stopping or (not gone and failures >= self.max_deliveries):
                        logger.error(
                            "entry %s of partition %d was not committed (%s); it stays pending and is "
                            "taken again later",
                            delivery.entry_id,
                            delivery.partition,
                            exc,
                        )
                        return
                    delay = min(_RETRY_CAP, _RETRY_BACKOFF * 2 ** min(failures - 1, 10))
                    delay *= 0.5 + random.random() / 2
                    logger.warning(
                        "entry %s of partition %d was not committed (%s); trying again in %.1f s",
                        delivery.entry_id,
                        delivery.partition,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                except Exception as exc:
                    # Not the storage: the entry itself, or a bug it runs into, fails its turn.  Each
                    # failure counts as a delivery, so it is parked after KRULES_MAX_DELIVERIES.
                    if failed is not None or self._stopping:
                        logger.error(
                            "entry %s of partition %d failed unexpectedly (%s: %s)%s; it stays pending",
                            delivery.entry_id,
                            delivery.partition,
                            type(exc).__name__,
                            exc,
                            " and could not be dead-lettered" if failed is not None else "",
                            exc_info=exc if failed is not None else None,
                        )
                        return
                    if delivery.deliveries >= self.max_deliveries:
                        failed = exc
                        continue
                    delay = min(_RETRY_CAP, _RETRY_BACKOFF * 2 ** min(delivery.deliveries - 1, 10))
                    delay *= 0.5 + random.random() / 2
                    logger.warning(
                        "entry %s of partition %d failed on delivery %d of %d (%s: %s); trying again in "
                        "%.1f s",
                        delivery.entry_id,
                        delivery.partition,
                        delivery.deliveries,
                        self.max_deliveries,
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    delivery.deliveries += 1
                    await asyncio.sleep(delay)
        finally:
            del self._inflight[delivery.partition, delivery.entry_id]
            self._room.set()

    async def _decide(self, delivery: Delivery) -> None:
        event = delivery.event
        if event is None:
            await self._dead_letter(delivery, INVALID_EVENT, delivery.problem or "not an event")
            return
        if delivery.deliveries > self.max_deliveries:
            await self._dead_letter(
                delivery,
                MAX_DELIVERIES,
                f"Event {event.id!r} was delivered {delivery.deliveries} times without being committed "
                f"(KRULES_MAX_DELIVERIES={self.max_deliveries}); it is parked instead of tried again.",
            )
            return
        if event.extensions:
            problem = entry_problem(event, self._replay_key)
            if problem is not None and REPLAY_SIGNATURE_EXTENSION in event.extensions:
                self._replay_key = await self.source.replay_key()  # first use, or a new key
                problem = entry_problem(event, self._replay_key)
            if problem is not None:
                await self._dead_letter(delivery, RESERVED_EXTENSION, problem)
                return
            if TIMER_EXTENSION in event.extensions and self.timer_lag_observers:
                lag = self.engine.clock.now() - event.time
                for observe in self.timer_lag_observers:
                    try:
                        observe(lag)
                    except Exception:
                        logger.exception("timer lag observer %r raised", observe)
        owner = partition_of(event.subject, self._partitions)
        if owner != delivery.partition:
            if delivery.fields.get(HOPS_FIELD):
                await self._dead_letter(
                    delivery,
                    MISROUTED,
                    f"Event {event.id!r} for subject {event.subject!r} (partition {owner}) was forwarded "
                    f"to partition {delivery.partition} already and is still in the wrong stream.",
                )
            else:
                await self.source.forward(delivery, owner)
            return
        await self.engine.process(event, receipt=self.source.receipt(delivery, event.id))

    async def _park(self, delivery: Delivery, error: Exception) -> None:
        """Dead-letter an entry whose handling kept failing (``max_deliveries``, with ``error``)."""
        event = delivery.event
        what = f"Event {event.id!r}" if event is not None else f"Stream entry {delivery.entry_id!r}"
        message = (
            f"{what} failed {delivery.deliveries} times (KRULES_MAX_DELIVERIES={self.max_deliveries}), "
            f"the last with {type(error).__name__}: {error}; it is parked instead of tried again."
        )
        try:
            await self._dead_letter(delivery, MAX_DELIVERIES, message, error)
        except StorageError:
            raise
        except Exception:
            if event is None:
                raise
            # The event cannot be stored as a dead letter either: keep the entry's fields instead.
            await self._dead_letter(replace(delivery, event=None), MAX_DELIVERIES, message, error)

    async def _dead_letter(
        self, delivery: Delivery, reason: str, message: str, error: Exception | None = None
    ) -> None:
        """Store the entry as a dead-letter subject and acknowledge it, in one commit (which also
        forgets the fired marker of a timer's firing: it will not run now)."""
        record = entry_dead_letter(delivery, reason, message, self.engine.clock.now(), error)
        receipt = self.source.receipt(delivery, f"entry:{delivery.partition}:{delivery.entry_id}")
        changes = store_changes(record)
        event = delivery.event
        if event is not None and event.extensions:
            key = event.extensions.get(TIMER_EXTENSION)
            if isinstance(key, str) and partition_of(event.subject, self._partitions) == delivery.partition:
                changes.append(SubjectChanges(event.subject, timers={key: Fired(event.id)}))
        await receipt.commit(changes)
        logger.error(
            "dead-lettered stream entry %s of partition %d as %s (%s): %s",
            delivery.entry_id,
            delivery.partition,
            record.name,
            reason,
            record.error["message"],
        )
        for observe in self.dead_letter_observers:
            try:
                observe("", reason)
            except Exception:
                logger.exception("dead-letter observer %r raised", observe)
