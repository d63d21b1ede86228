"""The partition streams on Redis: appending events, reading them as a consumer group, recovering.

Made by the entry points of :mod:`krules.transport.redis_streams` (which re-exports these classes).

:class:`RedisStreams` is both the :class:`~krules.transport.base.EventTransport` (``send`` appends each
event to its partition's stream; the entry format is :mod:`krules.transport.base`'s) and, for an
instance that owns partitions, the :class:`~krules.transport.base.PartitionSource` its
:class:`~krules.transport.worker.PartitionWorker` reads.  Keys are :mod:`storage.redis.keys`'s;
every command goes through the subject storage's connection and retry policy, except the
blocking ``XREAD`` that waits for new entries, which has a connection of its own (a blocked read
must not hold back the storage's replies).

An instance reads only the partitions it holds a lease on (:mod:`krules.transport.redis_leases`),
and everything it does on their behalf carries the lease as a *fence*: the reads and claims
(``lua/read.lua``, ``lua/claim.lua``) and the commit (``lua/store.lua``) check that the lease is still
the one the entry was read under, and writes to other partitions, forwards and a turn's outbox
(``lua/append.lua``) that no newer owner of the partition has started.  An instance that lost a
partition, paused or cut off, can therefore take, commit or send nothing of it afterwards
(:class:`~krules.errors.LeaseLostError`); its new owner runs the entries.

What an instance does, per partition it owns:

* on :meth:`RedisStreams.open`: check the partition count recorded in Redis (record it when it is
  the first instance), then take its first partitions (:meth:`~RedisStreams.tend`);
* :meth:`~RedisStreams.tend` (every ``KRULES_LEASE_RENEW_MS``): renew the leases, take a share of
  the free partitions, hand back those to give up; a partition taken is *taken over* before it is
  read: its stream and group created if missing, and every entry still pending in the group (the
  previous owner's) claimed, so that they are read first, in stream order;
* :meth:`~RedisStreams.read`: first its own pending entries, then new ones, ``COUNT`` at a time, one
  fenced script per partition in one round trip, then a blocking ``XREAD`` when none had anything;
  one ``ZMSCORE`` per batch drops the entries whose event id the partition already committed (an
  event re-sent by a re-run turn, a client retry), acknowledging them;
* :meth:`~RedisStreams.reclaim`: claim back its own entries idle longer than ``claim_idle_ms`` (a
  turn whose commit kept failing), with their delivery counts from ``XPENDING``;
* :meth:`~RedisStreams.move_due_timers` (every ``KRULES_TIMER_POLL_MS``): append the partition's
  due timers to its stream and remove them, in due order, in one fenced script (``lua/timers.lua``),
  so each due timer reaches the stream exactly once, and its turn commits like any entry's;
* :meth:`~RedisStreams.forward` appends an entry that belongs to another partition there, marked
  ``hops=1``, and acknowledges it (an entry the worker will not process becomes a dead-letter
  subject, committed with its ack through the storage: see :mod:`krules.transport.worker`);
* :meth:`~RedisStreams.maintain`: trim each stream to its oldest entry still pending or not yet
  delivered (one consumer group per stream, so nothing before that is needed again), ``XTRIM ...
  LIMIT`` repeated until done, so trimming keeps up at any rate; forget the consumers of earlier
  owners that have nothing pending;
* :meth:`~RedisStreams.close`: release the leases (their turns are over by then) and unregister.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Collection, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from redis.exceptions import ResponseError

from krules.dead_letters.signing import new_replay_key
from krules.errors import ConfigurationError, KRulesError, LeaseLostError, OverloadedError
from krules.events import Event
from krules.transport.base import (
    ENTRY_FIELD,
    HOPS_FIELD,
    Delivery,
    PartitionFigures,
    delivery_of,
    encode_entry,
)
from krules.transport.redis_replies import flat_map, group_info, stream_entries, stream_id, text
from krules.transport.redis_status import PartitionStatus, partition_status
from storage.redis import RedisStorage
from storage.redis._resp_connection import Arg, Command
from storage.redis.commands import RedisCommands
from storage.redis.keys import CONSUMER_GROUP, lease_epoch

if TYPE_CHECKING:
    from krules.changes import SubjectChanges
    from krules.ports import Receipt
    from krules.transport.redis_leases import PartitionLeases

__all__ = ["RedisStreams", "StreamReceipt"]

_log = logging.getLogger("storage.redis_streams")  # its name before the re-layout, kept for logging configs

_CLAIM_COUNT: Final = 100
_MEASURE_EVERY: Final = 1.0
"""Seconds a partition's measured backlog is trusted before it is measured again."""
_TRIM_LIMIT: Final = 10_000
"""Entries one ``XTRIM`` may remove: a short call, repeated until the stream is trimmed."""


class StreamReceipt:
    """A stream entry's receipt: committing it runs the storage's commit script, which stores the
    turn's writes, marks ``event_id`` processed and acknowledges the entry, all at once, if the
    partition's lease is still ``fence`` (the one the entry was read under; '' for no check)."""

    __slots__ = ("_storage", "entry_id", "event_id", "fence", "partition")

    def __init__(
        self, storage: RedisStorage, partition: int, event_id: str, entry_id: str, fence: str = ""
    ) -> None:
        self._storage = storage
        self.partition = partition
        self.event_id = event_id
        self.entry_id = entry_id
        self.fence = fence

    def commit(self, batch: Sequence[SubjectChanges]) -> Awaitable[bool]:
        """See :class:`krules.ports.Receipt` (a plain method: no coroutine of its own per turn)."""
        return self._storage.commit(batch, self)

    async def timer_live(self, subject: str, key: str) -> bool:
        """See :class:`krules.ports.Receipt`: the partition's fired marker of the timer (one
        ``HGET``) still names this entry, which the owner moved into the stream as its firing."""
        return await self._storage.fired_timer(subject, key) == self.entry_id


class RedisStreams:
    """The partition streams of one deployment; see the module docstring."""

    def __init__(
        self,
        storage: RedisStorage,
        *,
        leases: PartitionLeases | None = None,
        claim_idle_ms: int = 30_000,
        block_timeout: float = 1.0,
        count_checked: bool = False,
        max_backlog: int | None = None,
    ) -> None:
        """``leases``: this instance's partition leases, for an instance that reads partitions (None
        for a process that only sends).  ``count_checked``: the storage's partition count was read
        from Redis, no need to check it.  ``max_backlog``: the unprocessed entries (lag + pending) a
        partition's stream may hold before :meth:`admit` refuses events for it (None: no bound, and
        no measuring)."""
        self.storage = storage
        self.keys = storage.keys
        self.leases = leases
        self.consumer = leases.name if leases is not None else ""
        self.claim_idle_ms = claim_idle_ms
        self.tend_every: float | None = leases.renew_every if leases is not None else None
        self._commands: RedisCommands = storage.commands
        # Appends wait for the replicas only when asked to (KRULES_REDIS_WAIT_REPLICAS): chosen once.
        self._append_many = (
            storage.execute_replicated if storage.wait_replicas else self._commands.execute_many
        )
        self._block_timeout = block_timeout
        self._reader: RedisCommands | None = None
        self._readers: dict[int, RedisCommands] = {}  # on a cluster: partition -> its blocking reader
        self._waiting: dict[int, asyncio.Task[Any]] = {}  # on a cluster: partition -> its blocked XREAD
        self._cursors: dict[int, str] = {}  # "0": own pending entries first; ">": new ones
        self._owned_changed = asyncio.Event()
        self._ready: set[int] = set()  # owned partitions whose takeover is done: those are read
        self._scripts = {
            name: storage.script(name) for name in ("read", "claim", "reclaim", "append", "timers")
        }
        self._count_checked = count_checked
        self.max_backlog = max_backlog
        self._backlog: dict[int, tuple[int, float]] = {}  # partition -> (unprocessed, measured at)
        self._full: set[int] = set()  # partitions measured at or over max_backlog
        self.failing: str | None = None
        """Why the last read of the owned partitions failed (None: it did not)."""
        self._timers_pending: dict[int, int] = {}  # partition -> pending timers at its last move

    # -- the deployment ----------------------------------------------------------------------

    async def check_partition_count(self) -> None:
        """Record the partition count when none is; refuse (ConfigurationError) a different one."""
        try:
            self.keys = await self.storage.layout()
        except ConfigurationError:
            recorded = await self.storage.recorded_partitions()
            raise ConfigurationError(
                f"The krules deployment under key prefix {self.keys.prefix!r} has {recorded} partitions, "
                f"but this instance was started with KRULES_PARTITIONS={self.keys.partitions}; set "
                f"KRULES_PARTITIONS={recorded} or leave it unset (the count cannot change while subjects "
                "are stored by partition)."
            ) from None
        self._count_checked = True

    async def check(self) -> None:
        """The transport's start-up check: the partition count (see :meth:`check_partition_count`)."""
        await self.check_partition_count()

    @property
    def partitions(self) -> tuple[int, ...]:
        """The partitions this instance owns and reads now (once taken over)."""
        if self.leases is None:
            return ()
        ready = self._ready
        return tuple(p for p in self.leases.owned() if p in ready)

    async def open(self) -> None:
        """Check the partition count, register this instance and take its first partitions."""
        if self.leases is None:
            raise RuntimeError("these streams have no leases: they only send")
        await self.check_partition_count()
        self._reader = self._commands.blocking(self._block_timeout)
        await self.tend()

    async def tend(self, taking: bool = True) -> list[int]:
        """Renew and rebalance the leases (:meth:`PartitionLeases.tend`); start reading the
        partitions taken, pending entries first; return those to stop reading, whose turns the
        caller lets finish before :meth:`give_back`."""
        if self.leases is None:
            return []
        done = await self.leases.tend(taking)
        for partition in done.give_back:
            self._ready.discard(partition)
            self._cursors.pop(partition, None)
        if done.give_back:
            self._owned_changed.set()
        # Taken partitions are read once their takeover is done (tried again next round if it failed).
        for partition in self.leases.owned():
            if partition not in self._ready:
                await self._take_over(partition)
        return done.give_back

    async def give_back(self, partitions: list[int]) -> None:
        """Release the leases of ``partitions`` once their turns are over (see :meth:`tend`)."""
        if self.leases is not None:
            await self.leases.release(partitions)

    async def _take_over(self, partition: int) -> None:
        """Start reading a partition just taken: its group exists, every entry still pending in it
        (left by the previous owner) is this instance's, and they are read first, in stream order."""
        assert self.leases is not None
        await self._create_group(partition)
        fence = self.leases.fence(partition)
        start = "0-0"
        claimed = 0
        while True:
            reply = await self._eval(
                "claim",
                [self.keys.lease(partition), self.keys.stream(partition)],
                [fence, CONSUMER_GROUP, self.consumer, 0, start, _CLAIM_COUNT * 10, "JUSTID"],
                "take over the pending entries of partition %d",
                partition,
            )
            if int(reply[0]) != 1:
                self.leases.lost(partition)
                return
            start = text(reply[1][0])
            claimed += len(reply[1][1] or ())
            if start == "0-0":
                break
        self._cursors[partition] = "0"
        self._ready.add(partition)
        self._owned_changed.set()
        lease = self.leases.held[partition]
        _log.info(
            "took partition %d (epoch %d)%s",
            partition,
            lease.epoch,
            f", with {claimed} entr{'y' if claimed == 1 else 'ies'} left pending by its previous owner"
            if claimed
            else "",
        )

    async def _create_group(self, partition: int) -> None:
        stream = self.keys.stream(partition)

        async def create() -> None:
            try:
                await self._commands.execute("XGROUP", "CREATE", stream, CONSUMER_GROUP, "0", "MKSTREAM")
            except ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise

        await self._run(create, "create the consumer group of partition %d", partition)

    # -- sending -----------------------------------------------------------------------------

    async def admit(self, events: Sequence[Event]) -> None:
        """Refuse (OverloadedError) events for a partition whose stream was last measured holding
        ``max_backlog`` unprocessed entries or more (see :class:`krules.ports.EventTransport`).

        The measures ride along with :meth:`send` (at most one a second per partition); a partition
        found full is measured again here when its measure is a second old, so it is let in again
        once its owner has worked the backlog down."""
        if not self._full:
            return
        keys = self.keys
        full = {p for p in {keys.partition(event.subject) for event in events} if p in self._full}
        if not full:
            return
        stale = [p for p in full if time.monotonic() - self._backlog[p][1] >= _MEASURE_EVERY]
        if stale:
            commands: list[Command] = []
            for p in stale:
                commands += _measure(keys.stream(p))
            try:
                replies = await self._run(
                    partial(self._commands.execute_many, commands), "measure the backlog of the streams"
                )
            except KRulesError:  # the bound is a guard, not a gate: let the send tell what is wrong
                self._full.difference_update(stale)
                return
            self._measured(stale, replies)
        for p in sorted(full & self._full):
            backlog = self._backlog[p][0]
            raise OverloadedError(
                f"Partition {p}'s stream holds {backlog} events not yet processed, at its bound "
                f"(KRULES_MAX_STREAM_BACKLOG={self.max_backlog}); nothing was queued, so retry after "
                "a while.",
                "stream_backlog",
            )

    async def send(self, events: Sequence[Event], on_behalf_of: Receipt | None = None) -> list[str]:
        """Append each event to its partition's stream, in one round trip; return the entry ids.

        ``on_behalf_of``: the receipt of the turn sending them (its outbox): with a fence, each
        append is refused (LeaseLostError, before the turn commits) when a newer owner of the turn's
        partition has started.  With a ``max_backlog``, the backlog of the streams appended to is
        measured in the same round trip, at most once a second per partition (for :meth:`admit`)."""
        if not events:
            return []
        if not self._count_checked:
            await self.check_partition_count()
        keys = self.keys
        fence = getattr(on_behalf_of, "fence", "")
        source = getattr(on_behalf_of, "partition", -1)
        commands: list[Command] = []
        partitions: set[int] = set()
        for event in events:
            partition = keys.partition(event.subject)
            partitions.add(partition)
            entry: list[Arg] = [ENTRY_FIELD, encode_entry(event)[ENTRY_FIELD]]
            commands.append(self._append(partition, source, fence, entry))
        measure: list[int] = []
        if self.max_backlog is not None:
            now = time.monotonic()
            backlog = self._backlog
            measure = [p for p in partitions if p not in backlog or now - backlog[p][1] >= _MEASURE_EVERY]
            for p in measure:
                commands += _measure(keys.stream(p))  # after the XADDs: the stream exists by then
        replies = await self._run(
            partial(self._append_many, commands), "append %d event(s) to their streams", len(events)
        )
        if measure:
            self._measured(measure, replies[len(events) :])
        if not fence:
            return [text(reply) for reply in replies[: len(events)]]
        if any(int(reply[0]) != 1 for reply in replies[: len(events)]):
            raise _fenced(source, f"sending {len(events)} event(s) of its turn")
        return [text(reply[1]) for reply in replies[: len(events)]]

    def _append(self, partition: int, source: int, fence: str, entry: list[Arg]) -> Command:
        """The command appending ``entry`` to ``partition``'s stream: fenced by ``source``'s epoch
        (``lua/append.lua``) when ``fence`` is a lease, a plain ``XADD`` otherwise."""
        if not fence:
            return ("XADD", self.keys.stream(partition), "*", *entry)
        sha = self._scripts["append"].sha
        keys = (self.keys.fences(partition), self.keys.stream(partition))
        return ("EVALSHA", sha, 2, *keys, f"{source}:{lease_epoch(fence)}", *entry)

    def _measured(self, partitions: list[int], replies: Sequence[Any]) -> None:
        """Record the backlog of ``partitions`` from their :func:`_measure` replies."""
        now = time.monotonic()
        limit = self.max_backlog
        for i, p in enumerate(partitions):
            group, length = group_info(replies[2 * i]), int(replies[2 * i + 1])
            lag = None if group is None else group.get("lag")
            # no group yet, or Redis cannot tell its lag: the length bounds the backlog
            backlog = length if group is None or lag is None else int(lag) + int(group.get("pending", 0))
            self._backlog[p] = (backlog, now)
            if limit is not None and backlog >= limit:
                self._full.add(p)
            else:
                self._full.discard(p)

    # -- reading -----------------------------------------------------------------------------

    async def read(self, count: int, block_ms: int) -> list[Delivery]:
        """The owned partitions' pending entries first, then new ones (see :meth:`_read`); a failure
        is kept in :attr:`failing` (for ``/healthz``) until a read succeeds."""
        try:
            deliveries = await self._read(count, block_ms)
        except Exception as exc:
            self.failing = f"This instance cannot read its partitions: {exc}"
            raise
        self.failing = None
        return deliveries

    async def _read(self, count: int, block_ms: int) -> list[Delivery]:
        """The owned partitions' pending entries first, then new ones; see the module docstring.

        Each partition is read by ``lua/read.lua``, which refuses an instance whose lease is gone;
        when none has anything new, a blocking ``XREAD`` waits (up to ``block_ms``) for the next
        entry of any of them, and the next call reads it."""
        reader = self._reader
        if reader is None or self.leases is None:
            raise RuntimeError("open() the streams before reading them")
        owned = self.partitions
        if not owned:  # standing by: wait for a partition (the upkeep takes them)
            self._owned_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._owned_changed.wait(), block_ms / 1000)
            return []
        leases, keys, sha = self.leases, self.keys, self._scripts["read"].sha
        # The leases and cursors this read is made under: the partitions may be handed back or lost
        # (by the tending task) while it is under way.
        fences = {p: leases.fence(p) for p in owned}
        cursors = {p: self._cursors.setdefault(p, "0") for p in owned}
        commands: list[Command] = [
            (
                "EVALSHA",
                sha,
                2,
                keys.lease(p),
                keys.stream(p),
                fences[p],
                CONSUMER_GROUP,
                self.consumer,
                count,
                cursors[p],
            )
            for p in owned
        ]
        try:
            replies = await self._run(
                partial(self._commands.execute_many, commands), "read the partition streams"
            )
        except KRulesError as exc:
            if "NOGROUP" in str(exc):  # a stream was deleted (or the data lost): start it again
                _log.warning("partition stream or group missing (%s); creating it again", exc)
                for partition in owned:
                    await self._create_group(partition)
            raise
        deliveries: list[Delivery] = []
        history: list[tuple[int, list[Delivery]]] = []
        stale: list[tuple[int, str]] = []
        waits: list[tuple[int, str]] = []
        for partition, reply in zip(owned, replies, strict=True):
            fence = fences[partition]
            if not self.reading(partition, fence):
                continue  # its entries read now stay pending: its next owner takes them over
            status = int(reply[0])
            if status == _READ_FENCED:
                leases.lost(partition)
                continue
            if status == _READ_NOTHING:
                waits.append((partition, text(reply[1])))
                continue
            cursor = cursors[partition]
            entries = stream_entries(reply[1])
            if cursor != ">":
                self._cursors[partition] = entries[-1][0] if entries else ">"
            mine: list[Delivery] = []
            for entry_id, fields in entries:
                if fields is None:  # pending, but trimmed from the stream: nothing left to process
                    stale.append((partition, entry_id))
                else:
                    delivery = delivery_of(partition, entry_id, fields)
                    delivery.fence = fence
                    mine.append(delivery)
            if cursor != ">" and mine:
                history.append((partition, mine))
            deliveries += mine
        if stale:
            await self._ack(stale)
        if history:
            await self._count_deliveries(history)
        if not deliveries and len(waits) == len(owned):
            await self._wait(reader, waits, block_ms)
            return []
        return await self._drop_committed(deliveries)

    async def move_due_timers(self, now: float, limit: int = 1000) -> int:
        """Move the owned partitions' timers due by ``now`` (seconds since the epoch) into their
        streams, at most ``limit`` per partition, one script per partition in one round trip;
        return the most moved from one partition (``limit``: more may be due)."""
        leases, owned = self.leases, self.partitions
        if leases is None or not owned:
            return 0
        keys, sha = self.keys, self._scripts["timers"].sha
        fences = {p: leases.fence(p) for p in owned}
        commands: list[Command] = [
            (
                "EVALSHA",
                sha,
                5,
                keys.lease(p),
                keys.timers(p),
                keys.timer_records(p),
                keys.stream(p),
                keys.timers_fired(p),
                fences[p],
                int(now * 1000),
                limit,
                ENTRY_FIELD,
            )
            for p in owned
        ]
        replies = await self._run(partial(self._commands.execute_many, commands), "move the due timers")
        most = 0
        for partition, reply in zip(owned, replies, strict=True):
            if int(reply[0]) != 1:
                if self.reading(partition, fences[partition]):
                    leases.lost(partition)
                continue
            most = max(most, int(reply[1]))
            self._timers_pending[partition] = int(reply[2])
        return most

    def reading(self, partition: int, fence: str) -> bool:
        """Whether ``partition`` is still read under the lease ``fence``: not handed back, lost or
        taken again (with a new epoch) since a call made under that lease was sent."""
        return partition in self._ready and self.leases is not None and self.leases.fence(partition) == fence

    async def _wait(self, reader: RedisCommands, waits: list[tuple[int, str]], block_ms: int) -> None:
        """Block until an entry comes after ``waits``' last ids (or ``block_ms`` pass).

        On one server, one ``XREAD`` over every stream.  On a Redis Cluster the streams live in
        different slots, which no one command may span: each partition waits with an ``XREAD`` of its
        own, on a connection of its own, and the first to return ends the wait.  The others stay
        blocked, and a later wait of their partition joins them instead of sending another: their
        last id can only be older, so they still return on the next entry (or after ``block_ms``)."""
        if reader.cluster:
            await self._wait_apart(reader, waits, block_ms)
            return
        args: list[Arg] = ["XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS"]
        args += [self.keys.stream(p) for p, _ in waits]
        args += [last for _, last in waits]
        await self._run(partial(reader.execute, *args), "wait for events")

    async def _wait_apart(self, reader: RedisCommands, waits: list[tuple[int, str]], block_ms: int) -> None:
        """:meth:`_wait` on a Redis Cluster: one blocked ``XREAD`` per partition (see there)."""
        waiting = self._waiting
        for partition, last in waits:
            if partition not in waiting:
                own = self._readers.get(partition)
                if own is None:
                    own = self._readers[partition] = reader.blocking(self._block_timeout)
                args: list[Arg] = ["XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS"]
                args += [self.keys.stream(partition), last]
                waiting[partition] = asyncio.ensure_future(
                    self._run(partial(own.execute, *args), "wait for events of partition %d", partition)
                )
        tasks = [waiting[p] for p, _ in waits]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for partition, task in list(waiting.items()):
            if task.done():
                del waiting[partition]
                task.result()  # a failure after the storage's retries is the read's failure

    def receipt(self, delivery: Delivery, event_id: str) -> StreamReceipt:
        """The receipt committing ``delivery``: the writes, ``event_id`` processed, the entry acked,
        if the partition's lease is still the one the entry was read under."""
        return StreamReceipt(self.storage, delivery.partition, event_id, delivery.entry_id, delivery.fence)

    async def reclaim(self, busy: Collection[tuple[int, str]] = ()) -> list[Delivery]:
        """Take back this instance's entries left idle longer than ``claim_idle_ms`` (a turn whose
        commit kept failing), with their delivery counts, except those ``busy`` names (partition,
        entry id: still being worked on here); nothing of a partition whose lease is gone."""
        leases, owned = self.leases, self.partitions
        if leases is None or not owned:
            return []
        sha = self._scripts["reclaim"].sha
        fences = {p: leases.fence(p) for p in owned}
        working: dict[int, list[str]] = {}
        for partition, entry_id in busy:
            working.setdefault(partition, []).append(entry_id)
        commands: list[Command] = [
            (
                "EVALSHA",
                sha,
                2,
                self.keys.lease(p),
                self.keys.stream(p),
                fences[p],
                CONSUMER_GROUP,
                self.consumer,
                self.claim_idle_ms,
                _CLAIM_COUNT,
                *working.get(p, ()),
            )
            for p in owned
        ]
        replies = await self._run(partial(self._commands.execute_many, commands), "reclaim idle entries")
        claimed: list[tuple[int, list[Delivery]]] = []
        for partition, reply in zip(owned, replies, strict=True):
            fence = fences[partition]
            if not self.reading(partition, fence):
                continue  # handed back or lost meanwhile: what was claimed stays pending for the next owner
            if int(reply[0]) != 1:
                leases.lost(partition)
                continue
            found: list[Delivery] = []
            for entry_id, fields in stream_entries(reply[1]):
                if fields is not None:
                    delivery = delivery_of(partition, entry_id, fields)
                    delivery.fence = fence
                    found.append(delivery)
            if found:
                claimed.append((partition, found))
        if not claimed:
            return []
        await self._count_deliveries(claimed)
        deliveries = [d for _, found in claimed for d in found]
        _log.warning(
            "reclaimed %d entr%s left idle over %d ms (their turns could not be committed)",
            len(deliveries),
            "y" if len(deliveries) == 1 else "ies",
            self.claim_idle_ms,
        )
        return await self._drop_committed(deliveries)

    async def _count_deliveries(self, groups: list[tuple[int, list[Delivery]]]) -> None:
        """Fill in the delivery counts of entries taken from a pending list (one XPENDING each group)."""
        commands: list[Command] = [
            (
                "XPENDING",
                self.keys.stream(p),
                CONSUMER_GROUP,
                found[0].entry_id,
                found[-1].entry_id,
                len(found),
                self.consumer,
            )
            for p, found in groups
        ]
        replies = await self._run(partial(self._commands.execute_many, commands), "count deliveries")
        for (_, found), reply in zip(groups, replies, strict=True):
            counts = {text(row[0]): int(row[3]) for row in reply or ()}
            for delivery in found:
                delivery.deliveries = counts.get(delivery.entry_id, delivery.deliveries)

    async def _drop_committed(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Acknowledge and leave out the deliveries whose event the partition committed before."""
        by_partition: dict[int, list[Delivery]] = {}
        for delivery in deliveries:
            if delivery.event is not None:
                by_partition.setdefault(delivery.partition, []).append(delivery)
        if not by_partition:
            return deliveries
        groups = list(by_partition.items())
        commands: list[Command] = [
            ("ZMSCORE", self.keys.processed(p), *(d.event.id for d in found if d.event is not None))
            for p, found in groups
        ]
        replies = await self._run(partial(self._commands.execute_many, commands), "check processed events")
        done: set[tuple[int, str]] = set()
        for (partition, found), scores in zip(groups, replies, strict=True):
            for delivery, score in zip(found, scores, strict=True):
                if score is not None:
                    done.add((partition, delivery.entry_id))
        if not done:
            return deliveries
        _log.info("dropping %d re-delivered event(s) committed before", len(done))
        await self._ack(sorted(done))
        return [d for d in deliveries if (d.partition, d.entry_id) not in done]

    async def _ack(self, entries: Sequence[tuple[int, str]]) -> None:
        commands: list[Command] = [
            ("XACK", self.keys.stream(p), CONSUMER_GROUP, entry_id) for p, entry_id in entries
        ]
        await self._run(partial(self._commands.execute_many, commands), "acknowledge entries")

    # -- what is not processed ---------------------------------------------------------------

    async def forward(self, delivery: Delivery, partition: int) -> None:
        """Append ``delivery``'s entry to ``partition``'s stream (``hops=1``), then acknowledge it;
        refused (LeaseLostError) when a newer owner of the entry's partition has started."""
        fields = {**delivery.fields, HOPS_FIELD: "1"}
        flat: list[Arg] = []
        for name, value in fields.items():
            flat += (name, value)
        append = self._append(partition, delivery.partition, delivery.fence, flat)
        commands: list[Command] = [
            append,
            ("XACK", self.keys.stream(delivery.partition), CONSUMER_GROUP, delivery.entry_id),
        ]
        if append[0] == "EVALSHA" or self._commands.cluster or self.storage.wait_replicas:
            # The append is confirmed before the ack: on a Redis Cluster the two streams may live on
            # two nodes, and one command each would reach them in no particular order; with
            # replicas to wait for, the append is in them before its source entry is acknowledged.
            (reply,) = await self._run(
                partial(self._append_many, [append]), "forward entry %s", delivery.entry_id
            )
            if append[0] == "EVALSHA" and int(reply[0]) != 1:
                raise _fenced(delivery.partition, f"forwarding stream entry {delivery.entry_id!r}")
            commands = commands[1:]
        await self._run(partial(self._commands.execute_many, commands), "forward entry %s", delivery.entry_id)
        _log.info(
            "forwarded stream entry %s from partition %d to partition %d (its subject's)",
            delivery.entry_id,
            delivery.partition,
            partition,
        )

    async def replay_key(self) -> str:
        """The deployment's replay key, created when there is none (one round trip, not cached)."""
        key = self.keys.replay_key()
        commands: list[Command] = [("SET", key, new_replay_key(), "NX"), ("GET", key)]
        reply = await self._run(partial(self._commands.execute_many, commands), "read the replay key")
        return text(reply[1])

    # -- upkeep ------------------------------------------------------------------------------

    async def maintain(self) -> dict[int, PartitionFigures]:
        """Trim the owned streams to what is still needed; forget the consumers of earlier owners.

        Returns each owned partition's figures: its lag (entries not yet delivered to the group,
        None when Redis cannot tell), its pending entries (delivered, not acknowledged), its length
        after trimming, how many entries this upkeep trimmed and its pending timers (as the last
        move of due timers counted them)."""
        owned = self.partitions
        if not owned:
            return {}
        commands: list[Command] = []
        for p in owned:
            commands += [
                ("XPENDING", self.keys.stream(p), CONSUMER_GROUP),
                ("XINFO", "GROUPS", self.keys.stream(p)),
                ("XINFO", "CONSUMERS", self.keys.stream(p), CONSUMER_GROUP),
            ]
        replies = await self._run(partial(self._commands.execute_many, commands), "maintain the streams")
        keep: dict[int, str] = {}
        measured: dict[int, tuple[int | None, int]] = {}
        gone: list[Command] = []
        for i, p in enumerate(owned):
            pending, groups, consumers = replies[3 * i], replies[3 * i + 1], replies[3 * i + 2]
            for row in consumers or ():
                info = flat_map(row)
                name = text(info.get("name", ""))
                if name != self.consumer and not int(info.get("pending", 0) or 0):
                    gone.append(("XGROUP", "DELCONSUMER", self.keys.stream(p), CONSUMER_GROUP, name))
            group = group_info(groups)
            if group is None:
                continue
            lag = group.get("lag")
            measured[p] = (None if lag is None else int(lag), int(pending[0]) if pending else 0)
            oldest = text(group.get("last-delivered-id", "0-0"))
            if pending and int(pending[0]) > 0 and pending[1] is not None:
                oldest = min(oldest, text(pending[1]), key=stream_id)
            if oldest != "0-0":
                keep[p] = oldest
        if gone:  # consumers of earlier owners, with nothing pending: XINFO would list them for ever
            await self._run(partial(self._commands.execute_many, gone), "forget idle consumers")
        trimmed, lengths = await self._trim(keep, list(measured))
        timers = self._timers_pending
        return {
            p: PartitionFigures(lag, pending, lengths[p], trimmed.get(p, 0), timers.get(p))
            for p, (lag, pending) in measured.items()
        }

    async def _trim(self, keep: dict[int, str], measure: list[int]) -> tuple[dict[int, int], dict[int, int]]:
        """Trim each stream to the entry ``keep`` names (entries before it are all acknowledged and
        delivered) with ``XTRIM MINID ~ LIMIT`` until nothing more goes; return the entries trimmed
        per partition and the lengths of the streams of ``measure`` afterwards.

        Approximate trimming frees whole stream nodes, so the node holding the kept entry stays;
        ``LIMIT`` keeps each call short (Redis' default limit without it, 10,000 entries a call, is
        what let a busy stream outgrow its trimming).  A call removing nothing ends a stream's
        trimming, so every processed entry but those of the last node goes in one upkeep; the
        ``XLEN`` of each round rides along, the last round's being the lengths after trimming."""
        trimmed = dict.fromkeys(keep, 0)
        left = dict(keep)
        if not left and not measure:
            return trimmed, {}
        while True:
            commands: list[Command] = [
                ("XTRIM", self.keys.stream(p), "MINID", "~", oldest, "LIMIT", _TRIM_LIMIT)
                for p, oldest in left.items()
            ]
            commands += [("XLEN", self.keys.stream(p)) for p in measure]
            replies = await self._run(partial(self._commands.execute_many, commands), "trim the streams")
            progress = False
            for p, removed in zip(list(left), replies[: len(left)], strict=True):
                if int(removed):
                    trimmed[p] += int(removed)
                    progress = True
                else:
                    del left[p]
            if not progress:
                lengths = replies[len(replies) - len(measure) :]
                return trimmed, {p: int(length) for p, length in zip(measure, lengths, strict=True)}

    async def close(self) -> None:
        """Release the leases, unregister this instance and close the reading connection (the
        storage stays open).  Call it once the turns under way are over."""
        if self.leases is not None:
            owned = self.leases.owned()
            try:
                await self.leases.leave()
            except Exception as exc:  # stopping anyway: the leases expire, the registration goes stale
                _log.warning("could not release the partition leases (%s); they expire on their own", exc)
            else:
                if owned:
                    _log.info("released partition(s) %s", ",".join(map(str, owned)))
        waiting, self._waiting = self._waiting, {}
        for task in waiting.values():
            task.cancel()
        await asyncio.gather(*waiting.values(), return_exceptions=True)
        readers, self._readers = self._readers, {}
        for own in readers.values():
            await own.aclose()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not self._commands:
            await reader.aclose()

    # -- inspection --------------------------------------------------------------------------

    async def status(self) -> list[PartitionStatus]:
        """Every partition's figures for ``krules partitions`` (see :mod:`krules.transport.redis_status`)."""
        return await partition_status(self.storage)

    # -- plumbing ----------------------------------------------------------------------------

    async def _run(self, op: Any, action: str, *details: object) -> Any:
        return await self.storage.run(op, action, *details)

    async def _eval(
        self, script: str, keys: list[str], args: list[Arg], action: str, *details: object
    ) -> Any:
        sha = self._scripts[script].sha
        return await self._run(partial(self._commands.evalsha, sha, keys, args), action, *details)


_READ_FENCED: Final = 0
_READ_NOTHING: Final = 2
"""Statuses of ``lua/read.lua`` (1: entries)."""


def _fenced(partition: int, what: str) -> LeaseLostError:
    return LeaseLostError(
        f"Partition {partition}'s lease is no longer this instance's, so {what} was refused; the "
        "partition's new owner runs its entries.",
        partition,
    )


def _measure(stream: str) -> list[Command]:
    """The commands measuring a stream's backlog: its consumer group's lag and pending, its length."""
    return [("XINFO", "GROUPS", stream), ("XLEN", stream)]
