"""An in-process transport: partition streams as lists, for running the partition worker without Redis.

:class:`MemoryStreams` is both an :class:`~krules.ports.EventTransport` and a
:class:`~krules.transport.base.PartitionSource` over any :class:`~krules.ports.SubjectStorage`, with
the Redis streams' semantics where a test can see them: entries in the stream format of
:mod:`krules.transport.base`, pending until committed, delivery counts, ids committed once (a commit
of an id seen before writes nothing and returns False), entries forwarded to their subject's
partition.  It is what dramatiq's stub broker is to its Redis broker: the worker, dead-lettering and
the engine's receipts tested in memory.  Nothing survives the process, and one process owns all
partitions, so it is not an embedded mode of its own (that one processes events without streams).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from krules.dead_letters.signing import new_replay_key
from krules.errors import OverloadedError
from krules.partitioning import partition_of
from krules.transport.base import HOPS_FIELD, Delivery, PartitionFigures, delivery_of, encode_entry

if TYPE_CHECKING:
    from krules.changes import SubjectChanges
    from krules.events import Event
    from krules.ports import Receipt, SubjectStorage

__all__ = ["MemoryReceipt", "MemoryStreams"]


class MemoryReceipt:
    """A memory entry's receipt: the writes stored, the id remembered and the entry acknowledged."""

    __slots__ = ("_streams", "entry_id", "event_id", "partition")

    def __init__(self, streams: MemoryStreams, partition: int, event_id: str, entry_id: str) -> None:
        self._streams = streams
        self.partition = partition
        self.event_id = event_id
        self.entry_id = entry_id

    def commit(self, batch: Sequence[SubjectChanges]) -> Awaitable[bool]:
        """See :class:`krules.ports.Receipt`."""
        return self._streams.commit(batch, self)

    async def timer_live(self, subject: str, key: str) -> bool:
        """See :class:`krules.ports.Receipt`: never; nothing moves timers into memory streams, so an
        entry carrying ``krulestimer`` here is no timer's firing."""
        return False


class MemoryStreams:
    """``partitions`` streams in this process, read by one consumer that owns them all."""

    def __init__(self, storage: SubjectStorage, partitions: int = 1, max_backlog: int | None = None) -> None:
        """``max_backlog``: the unacknowledged entries a partition may hold before :meth:`admit`
        refuses events for it (None: no bound)."""
        self.storage = storage
        self.max_backlog = max_backlog
        self.total = partitions
        self.partitions = tuple(range(partitions))
        self.entries: dict[int, dict[str, dict[str, str | bytes]]] = {p: {} for p in self.partitions}
        """Each partition's entries not yet acknowledged, by entry id, in append order."""
        self.deliveries: dict[tuple[int, str], int] = {}
        self.committed: set[str] = set()
        """Event ids committed (the Redis streams keep them for a dedupe window; here, for ever)."""
        self._delivered: set[tuple[int, str]] = set()
        self._ids = itertools.count(1)
        self._arrived = asyncio.Event()
        self._lock = asyncio.Lock()  # a commit is atomic: its check, its writes and its ack
        self._replay_key = new_replay_key()

    # -- transport ---------------------------------------------------------------------------
    async def check(self) -> None:
        """Nothing to verify in memory."""

    async def admit(self, events: Sequence[Event]) -> None:
        """Refuse (OverloadedError) events for a partition holding ``max_backlog`` entries or more."""
        if self.max_backlog is None:
            return
        for partition in {partition_of(event.subject, self.total) for event in events}:
            backlog = len(self.entries[partition])
            if backlog >= self.max_backlog:
                raise OverloadedError(
                    f"Partition {partition} holds {backlog} unprocessed events, its bound is "
                    f"{self.max_backlog}; retry later.",
                    "stream_backlog",
                )

    async def send(self, events: Sequence[Event], on_behalf_of: Receipt | None = None) -> list[str]:
        """Append each event to its subject's partition; return the entry ids (one process owns
        every partition: nothing to fence)."""
        ids = []
        for event in events:
            partition = partition_of(event.subject, self.total)
            ids.append(self.append(partition, encode_entry(event)))
        return ids

    def append(self, partition: int, fields: Mapping[str, str | bytes]) -> str:
        """Append raw entry ``fields`` to ``partition`` (as another service's ``XADD`` would)."""
        entry_id = f"{next(self._ids)}-0"
        self.entries[partition][entry_id] = dict(fields)
        self._arrived.set()
        return entry_id

    # -- partition source --------------------------------------------------------------------
    tend_every: float | None = None
    """The partitions never change hands: one process owns them all."""

    async def open(self) -> None:
        """Nothing to create in memory."""

    async def tend(self, taking: bool = True) -> list[int]:
        """Nothing to renew: no other instance can take a partition."""
        return []

    async def give_back(self, partitions: list[int]) -> None:
        """Never called (:meth:`tend` hands nothing back)."""

    async def read(self, count: int, block_ms: int) -> list[Delivery]:
        """Entries not delivered yet, oldest first, waiting up to ``block_ms`` for one."""
        found = self._undelivered(count)
        if not found:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), block_ms / 1000)
            except TimeoutError:
                return []
            found = self._undelivered(count)
        deliveries = []
        for partition, entry_id, fields in found:
            key = (partition, entry_id)
            self._delivered.add(key)
            self.deliveries[key] = self.deliveries.get(key, 0) + 1
            deliveries.append(delivery_of(partition, entry_id, dict(fields), self.deliveries[key]))
        return deliveries

    def _undelivered(self, count: int) -> list[tuple[int, str, dict[str, str | bytes]]]:
        found = []
        for partition in self.partitions:
            for entry_id, fields in self.entries[partition].items():
                if (partition, entry_id) not in self._delivered:
                    found.append((partition, entry_id, fields))
                    if len(found) == count:
                        return found
        return found

    def reading(self, partition: int, fence: str) -> bool:
        """Always: one process owns every partition for good."""
        return True

    def receipt(self, delivery: Delivery, event_id: str) -> MemoryReceipt:
        """The receipt committing ``delivery``."""
        return MemoryReceipt(self, delivery.partition, event_id, delivery.entry_id)

    async def commit(self, batch: Sequence[SubjectChanges], receipt: MemoryReceipt) -> bool:
        """Store ``batch``, remember the event id and acknowledge the entry; False (nothing stored,
        the entry acknowledged) when the id was committed before."""
        async with self._lock:
            fresh = receipt.event_id not in self.committed
            if fresh:
                await self.storage.store(batch)
                self.committed.add(receipt.event_id)
            self._ack(receipt.partition, receipt.entry_id)
            return fresh

    def _ack(self, partition: int, entry_id: str) -> None:
        self.entries[partition].pop(entry_id, None)
        self._delivered.discard((partition, entry_id))
        self.deliveries.pop((partition, entry_id), None)

    async def reclaim(self, busy: Collection[tuple[int, str]] = ()) -> list[Delivery]:
        """Nothing to reclaim: the one consumer holds every entry it was delivered."""
        return []

    async def forward(self, delivery: Delivery, partition: int) -> None:
        """Append the entry to ``partition`` marked as forwarded, then acknowledge it."""
        self.append(partition, {**delivery.fields, HOPS_FIELD: "1"})
        self._ack(delivery.partition, delivery.entry_id)

    async def replay_key(self) -> str:
        """This process's replay key (the streams live here, so does the key)."""
        return self._replay_key

    def release(self, delivery: Delivery) -> None:
        """Make a delivered, uncommitted entry deliverable again (what a reclaim after a crash does)."""
        self._delivered.discard((delivery.partition, delivery.entry_id))
        self._arrived.set()

    async def maintain(self) -> dict[int, PartitionFigures]:
        """Each partition's lag and pending entries (entries not delivered yet, and delivered not
        acked); acknowledged entries are gone at once, so the length is what is left."""
        figures: dict[int, PartitionFigures] = {}
        for partition in self.partitions:
            pending = sum(1 for key in self._delivered if key[0] == partition)
            length = len(self.entries[partition])
            figures[partition] = PartitionFigures(length - pending, pending, length)
        return figures

    async def close(self) -> None:
        """Nothing to release."""
