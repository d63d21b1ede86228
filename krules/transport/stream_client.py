"""Python clients that append events straight to a Redis-mode deployment's partition streams.

:class:`StreamClient` / :class:`AsyncStreamClient` write the entry format of
:mod:`krules.transport.base`, reading the partition count the instances recorded; failures are
:class:`~krules.errors.StorageError` or :class:`~krules.errors.ConfigurationError`::

    async with AsyncStreamClient("redis://127.0.0.1:6379/0") as client:
        event_id = await client.emit("order.submitted", "order-1", {"total": 30})

An emitted event's id is returned once it is queued; sending the same event (same id) again is
harmless, its partition drops ids it has processed.  An event the deployment would refuse (see
:mod:`krules.decoding`) raises :class:`~krules.errors.EventFormatError` before anything is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from krules.client_events import build_event, build_events
from krules.errors import EventFormatError
from krules.events import Event, event_from_cloudevent
from krules.transport.base import encode_entry
from krules.validation import RESERVED_PREFIX, reserved_attribute

if TYPE_CHECKING:
    from krules.transport.redis_streams import RedisStreams

__all__ = ["AsyncStreamClient", "StreamClient"]


def _checked(events: list[Event]) -> list[Event]:
    """``events``, once each is known to fit in a stream entry (EventFormatError before connecting;
    the entry is encoded again when sent, a client's emit is not a hot path)."""
    for event in events:
        encode_entry(event)
    return events


def _batch_events(events: Iterable[Mapping[str, Any]]) -> list[Event]:
    return _checked([event_from_cloudevent(event) for event in build_events(events)])


class AsyncStreamClient:
    """Appends events to the partition streams of a Redis-mode krules deployment (asyncio)."""

    def __init__(self, redis_url: str, key_prefix: str = "krules:") -> None:
        from storage.redis import create_redis_storage  # the Redis backend only when this client is used

        self._storage = create_redis_storage(redis_url, key_prefix)
        self._streams: RedisStreams | None = None

    async def _connected(self) -> RedisStreams:
        if self._streams is None:
            from krules.transport.redis_streams import connect_streams

            self._streams = await connect_streams(self._storage)
        return self._streams

    async def emit(
        self, type: str, subject: str, data: Mapping[str, Any] | None = None, **extensions: Any
    ) -> str:
        """Queue one event on its partition's stream; return its id."""
        (event,) = _checked([event_from_cloudevent(build_event(type, subject, data, **extensions))])
        await (await self._connected()).send([event])
        return event.id

    async def emit_batch(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Queue several events (mappings with ``type``, ``subject``, optional ``data`` and extensions)
        in one round trip; return their ids."""
        built = _batch_events(events)
        await (await self._connected()).send(built)
        return [event.id for event in built]

    async def send(self, events: list[Event]) -> list[str]:
        """Queue events built elsewhere (their ids are kept); return the stream entry ids.

        An event carrying a ``krules*`` extension is refused (EventFormatError, nothing sent): those
        are the engine's own, and the workers dead-letter them."""
        for event in events:
            name = reserved_attribute(event)
            if name is not None:
                raise EventFormatError(
                    f"Event {event.id!r} carries the extension {name!r}; extensions named "
                    f"{RESERVED_PREFIX}* are the krules engine's own and cannot be sent."
                )
        return await (await self._connected()).send(events)

    async def aclose(self) -> None:
        """Close the Redis connection."""
        await self._storage.close()

    async def __aenter__(self) -> AsyncStreamClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class StreamClient:
    """Appends events to the partition streams of a Redis-mode krules deployment (blocking)."""

    def __init__(self, redis_url: str, key_prefix: str = "krules:") -> None:
        self._loop = asyncio.new_event_loop()
        self._client = AsyncStreamClient(redis_url, key_prefix)

    def emit(self, type: str, subject: str, data: Mapping[str, Any] | None = None, **extensions: Any) -> str:
        """Queue one event on its partition's stream; return its id."""
        return self._loop.run_until_complete(self._client.emit(type, subject, data, **extensions))

    def emit_batch(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Queue several events in one round trip; return their ids."""
        return self._loop.run_until_complete(self._client.emit_batch(events))

    def close(self) -> None:
        """Close the Redis connection and the client's event loop."""
        try:
            self._loop.run_until_complete(self._client.aclose())
        finally:
            self._loop.close()

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
