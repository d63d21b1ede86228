"""How events travel between instances: the partition-stream entry format and the transport protocols.

In Redis mode every partition ``p`` has a stream (key ``<prefix>{p<p>}:stream``, see
:mod:`storage.redis.keys`) read by one consumer group, and every event is one entry of the stream of its
subject's partition.  The entry format is deliberately small, so any service can append events::

    XADD <prefix>{p<P>}:stream * event <the CloudEvent, structured-mode JSON>

    P = crc32(utf8(subject)) % N       (krules.partitioning; N = GET <prefix>partitions)

The ``event`` field holds one CloudEvents 1.0 event in JSON format (``specversion``, ``id``,
``source``, ``type``, ``subject``, optional ``time`` (RFC 3339 with a zone) and
``datacontenttype``, ``data`` a JSON object, extensions as top-level attributes).  The ``id`` must
be unique per event and stable across retries of the same send: a partition drops an event whose id
it committed before (within the dedupe window).  krules adds a ``hops`` field (``1``) to an entry
it forwards to the right partition; an entry in the wrong stream with ``hops`` set is
dead-lettered instead of forwarded again.

An entry is decoded strictly (:mod:`krules.decoding`: UTF-8 never replaced, no lone surrogates, at
most :data:`~krules.decoding.MAX_EVENT_BYTES`, data nested at most
:data:`~krules.decoding.MAX_NESTING` levels).  Whatever goes wrong decoding an entry, expected or
not, makes it a :class:`Delivery` without an event, which the worker dead-letters as
``invalid_event`` with the entry's fields (dead letters are subjects, see
:mod:`krules.dead_letters`): no entry can stop a partition.

:class:`EventTransport` appends events to their partitions' streams; :class:`PartitionSource` is
what :class:`krules.transport.worker.PartitionWorker` reads them from.  The Redis implementation is
:class:`krules.transport.redis_transport.RedisStreams`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from krules.decoding import MAX_EVENT_BYTES, SURROGATE, check_data, load_json
from krules.errors import EventFormatError
from krules.events import Event, event_from_dict
from krules.ports import EventTransport, Receipt

__all__ = [
    "ENTRY_FIELD",
    "HOPS_FIELD",
    "Delivery",
    "EventTransport",
    "PartitionFigures",
    "PartitionSource",
    "decode_entry",
    "delivery_of",
    "encode_entry",
]

ENTRY_FIELD: Final = "event"
"""The stream entry field holding the CloudEvent JSON."""

HOPS_FIELD: Final = "hops"
"""The stream entry field krules sets on an entry it forwarded to its subject's partition."""


def encode_entry(event: Event) -> dict[str, str]:
    """The stream entry fields of ``event``; EventFormatError when the entry would be refused
    (too large, a lone surrogate, a non-finite number), so it is refused before it is sent."""
    try:
        text = json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise EventFormatError(
            f"Event {event.id!r} of type {event.type!r} cannot be sent as JSON ({exc})."
        ) from None
    if not text.isascii() and SURROGATE.search(text):
        check_data(event.to_dict(), f"Event {event.id!r} of type {event.type!r}", envelopes=1, root="$")
    if len(text) > MAX_EVENT_BYTES // 4 and len(text.encode()) > MAX_EVENT_BYTES:
        raise EventFormatError(
            f"Event {event.id!r} of type {event.type!r} is {len(text.encode())} bytes of JSON, more "
            f"than the {MAX_EVENT_BYTES} an event may be; send smaller events."
        )
    return {ENTRY_FIELD: text}


_ENTRY: Final = f"The stream entry's {ENTRY_FIELD!r} field"


def decode_entry(fields: Mapping[str, str | bytes]) -> Event:
    """The event of a stream entry; EventFormatError (one sentence) when it is not a valid one."""
    raw = fields.get(ENTRY_FIELD)
    if raw is None:
        names = ", ".join(sorted(fields)) or "none"
        raise EventFormatError(
            f"The stream entry has no {ENTRY_FIELD!r} field (its fields: {names}); "
            "an entry holds one CloudEvent as JSON in that field."
        )
    return event_from_dict(load_json(raw, _ENTRY))


def delivery_of(
    partition: int, entry_id: str, fields: dict[str, str | bytes], deliveries: int = 1
) -> Delivery:
    """The delivery of an entry read from a stream: its event, or why it has none.  Never raises:
    whatever decoding the entry raises makes it a delivery the worker dead-letters."""
    try:
        event = decode_entry(fields)
    except EventFormatError as exc:
        return Delivery(partition, entry_id, fields, None, str(exc), deliveries)
    except Exception as exc:  # not foreseen, but an entry must never stop the partition
        problem = f"The stream entry could not be decoded ({type(exc).__name__}: {exc})."
        return Delivery(partition, entry_id, fields, None, problem, deliveries)
    return Delivery(partition, entry_id, fields, event, None, deliveries)


@dataclass(slots=True)
class Delivery:
    """One stream entry handed to this instance: the event, or why it is not one."""

    partition: int
    """The partition whose stream holds the entry."""
    entry_id: str
    """The entry's stream id (what the commit acknowledges)."""
    fields: dict[str, str | bytes]
    """The entry as stored (kept for dead-lettering and forwarding): a value that is not UTF-8
    stays ``bytes``."""
    event: Event | None
    """The decoded event, or None when the entry is not a valid event (see ``problem``)."""
    problem: str | None = None
    """Why the entry is not a valid event."""
    deliveries: int = 1
    """How many times the entry has been delivered, this time included."""
    fence: str = ""
    """The partition's lease the entry was read under ('' where there are no leases): its turn's
    writes are refused once that lease is gone (see :mod:`krules.transport.redis_leases`)."""


class PartitionFigures(NamedTuple):
    """One owned partition's figures, measured at upkeep (see :meth:`PartitionSource.maintain`)."""

    lag: int | None
    """Entries not yet delivered to the consumer group (None when the source cannot tell)."""
    pending: int
    """Entries delivered but not yet acknowledged."""
    length: int | None = None
    """Entries in the stream after trimming (None when the source keeps no such thing)."""
    trimmed: int = 0
    """Entries removed by this upkeep (all processed: trimming stops at the oldest one still needed)."""
    timers: int | None = None
    """Timers pending in the partition, as its last move of due timers counted them (None: unknown)."""


class PartitionSource(Protocol):
    """The partitions an instance owns, as a source of deliveries (Redis Streams in practice)."""

    @property
    def partitions(self) -> tuple[int, ...]:
        """The partitions read now (with leases, this changes as instances come and go)."""
        ...

    tend_every: float | None
    """Seconds between two :meth:`tend` calls (None: the partitions never change)."""

    async def open(self) -> None:
        """Check the deployment (partition count), create what is missing, take this instance's
        first partitions."""
        ...

    async def tend(self, taking: bool = True) -> list[int]:
        """Keep the partitions: renew their leases, take a share of the free ones (unless not
        ``taking``: a stopping instance only keeps what it has); return those to stop reading
        (handed back or lost), which :meth:`give_back` releases once their turns are over."""
        ...

    async def give_back(self, partitions: list[int]) -> None:
        """Release ``partitions`` (returned by :meth:`tend`) now that their turns are over."""
        ...

    async def read(self, count: int, block_ms: int) -> list[Delivery]:
        """The next deliveries: this consumer's own pending entries first, then new ones (waiting
        up to ``block_ms`` for them).  Entries whose event was committed before are acknowledged
        and left out."""
        ...

    def reading(self, partition: int, fence: str) -> bool:
        """Whether ``partition`` is still read under the lease ``fence`` (an entry read under it may
        be started): False once the partition was handed back, lost or taken again since."""
        ...

    def receipt(self, delivery: Delivery, event_id: str) -> Receipt:
        """The receipt a turn (or a dead letter) of ``delivery`` commits with: its writes, ``event_id``
        marked processed and the entry acknowledged, at once."""
        ...

    async def reclaim(self, busy: Collection[tuple[int, str]] = ()) -> list[Delivery]:
        """This instance's entries left idle too long (their turns could not be committed), except
        those ``busy`` names (partition, entry id), still being worked on."""
        ...

    async def forward(self, delivery: Delivery, partition: int) -> None:
        """Append the entry to ``partition``'s stream (marked as forwarded), then acknowledge it."""
        ...

    async def replay_key(self) -> str:
        """The deployment's replay key (created when there is none), which replays written to a
        stream are signed with (:mod:`krules.dead_letters.signing`)."""
        ...

    async def maintain(self) -> dict[int, PartitionFigures]:
        """Periodic upkeep: trim what every consumer has read; return each owned partition's figures."""
        ...

    async def close(self) -> None:
        """Release the partitions, unregister, and release what :meth:`open` opened."""
        ...
