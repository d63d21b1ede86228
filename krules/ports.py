"""What the engine core needs from the outside: subject storage, a receipt to commit a turn with,
and a transport that sends events to their partitions.

The core depends on these Protocols only; the drivers (:mod:`storage.memory`, :mod:`storage.redis`,
:mod:`krules.transport.redis_transport`) implement them, and :mod:`krules.assembly` plugs them in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from krules.changes import SubjectChanges
    from krules.events import Event

__all__ = ["EventTransport", "Receipt", "SubjectStorage"]


@runtime_checkable
class SubjectStorage(Protocol):
    """What the engine needs from a subject storage backend.

    All values crossing this protocol are already decoded Python values, except inside
    :class:`SubjectChanges`, which carries JSON.  ``ext`` selects extended properties.
    """

    async def load(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return ``(properties, extended_properties)`` of subject ``name`` (empty dicts if unknown)."""
        ...

    async def store(self, batch: Sequence[SubjectChanges]) -> None:
        """Apply the changes of several subjects; each subject's changes atomically."""
        ...

    async def get(self, name: str, prop: str, *, ext: bool = False) -> Any:
        """Return one stored property; raise ``KeyError`` when it does not exist."""
        ...

    async def set(self, name: str, prop: str, value: str, *, ext: bool = False) -> tuple[bool, Any]:
        """Store one JSON value now; return ``(existed, old_value)``."""
        ...

    async def update(
        self, name: str, prop: str, fn: Callable[[Any], Any], *, ext: bool = False
    ) -> tuple[Any, Any, bool]:
        """Atomically apply ``fn`` to the stored value (None when missing); return ``(new, old, existed)``."""
        ...

    async def delete(self, name: str, prop: str, *, ext: bool = False) -> tuple[bool, Any]:
        """Remove one property now; return ``(existed, old_value)``."""
        ...

    async def flush(self, name: str) -> None:
        """Remove the subject and all its properties."""
        ...

    async def subjects(self, prefix: str = "") -> list[str]:
        """Return the names of stored subjects that start with ``prefix``, sorted."""
        ...

    async def check(self) -> None:
        """Verify the storage is reachable; raise a :class:`~krules.errors.StorageError` saying why not."""
        ...

    async def close(self) -> None:
        """Release connections; the storage is not used afterwards."""
        ...


class Receipt(Protocol):
    """Where a turn's root event came from (a transport's delivery); the turn ends by committing it.

    The engine reads ``partition`` and ``event_id``; everything else about the delivery (a stream
    entry id, a consumer group) is the transport's business.
    """

    @property
    def partition(self) -> int:
        """The partition that delivered the event (its subject's partition)."""
        ...

    @property
    def event_id(self) -> str:
        """The id recorded as processed by the commit."""
        ...

    def commit(self, batch: Sequence[SubjectChanges]) -> Awaitable[bool]:
        """Store a turn's changes, mark the event processed and acknowledge its delivery, atomically
        for the subjects of :attr:`partition`; False (nothing of that partition written) when the
        event had been committed before."""
        ...

    def timer_live(self, subject: str, key: str) -> Awaitable[bool]:
        """Whether the event delivered, carrying ``krulestimer`` = ``key``, is the firing of
        ``subject``'s timer ``key`` still on its way: fired by krules (not written by hand) and
        neither cancelled nor scheduled again since.  Asked only of timer events, once their turn
        has its subject's lane; False: the turn runs nothing and only commits."""
        ...


class EventTransport(Protocol):
    """Appends events to the streams of their subjects' partitions."""

    async def check(self) -> None:
        """Verify the transport can be used (e.g. the partition count matches); raise a KRulesError."""
        ...

    async def admit(self, events: Sequence[Event]) -> None:
        """Raise :class:`~krules.errors.OverloadedError` when a partition ``events`` go to holds more
        unprocessed events than the transport's bound (what the ingress asks before accepting them).

        Cheap: it reads figures measured along earlier sends, with a round trip at most about once
        a second per partition found over its bound (to see it drain)."""
        ...

    async def send(self, events: Sequence[Event], on_behalf_of: Receipt | None = None) -> list[str]:
        """Append ``events`` (each to its partition's stream); return the entry ids.

        Raises a StorageError when they could not all be appended (appending is retried inside);
        sending the same events again is safe, since receivers drop ids they committed.
        ``on_behalf_of``: the receipt of the turn whose outbox they are (a transport with partition
        leases refuses them, :class:`~krules.errors.LeaseLostError`, once that turn's partition has
        a newer owner).
        """
        ...
