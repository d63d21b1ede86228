"""A partition handed back or lost while a read or a reclaim of it is under way, on a real
redis-server.

The leases are tended by a task of their own, so a partition can be handed back (its cursors
dropped) or found lost (its lease forgotten) while a call reading its stream waits for Redis.  What
that call brought back must not be processed here: it stays pending, for the partition's next
owner, and nothing of it is started without the lease it was read under.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from krules.events import Event
from krules.testing.redis_server import LocalRedisServer
from krules.transport.redis_leases import PartitionLeases
from krules.transport.redis_streams import RedisStreams
from storage.redis import create_redis_storage
from storage.redis.keys import CONSUMER_GROUP

pytestmark = pytest.mark.redis_server


@pytest.fixture
async def streams(redis_server: LocalRedisServer, redis_key_prefix: str) -> AsyncIterator[RedisStreams]:
    """The streams of the only instance of a 1-partition deployment (so it owns partition 0), opened,
    with no worker, reclaiming entries idle for 100 ms."""
    storage = create_redis_storage(redis_server.url, redis_key_prefix, partitions=1)
    streams = RedisStreams(storage, leases=PartitionLeases(storage, name="reader"), claim_idle_ms=100)
    await streams.open()
    assert await streams.read(10, 1) == []  # its own pending entries (none): new ones are read next
    yield streams
    await streams.close()
    await storage.close()


def lost(streams: RedisStreams) -> Callable[[], Awaitable[None]]:
    """A fenced call of another task finds partition 0's lease gone."""

    async def change() -> None:
        assert streams.leases is not None
        streams.leases.lost(0)

    return change


def handed_back(streams: RedisStreams) -> Callable[[], Awaitable[None]]:
    """The tending task hands partition 0 back (it stops being read, its cursors are dropped)."""

    async def change() -> None:
        assert streams.leases is not None
        streams.leases.lost(0)
        assert await streams.tend() == [0]

    return change


def during(streams: RedisStreams, action: str, change: Callable[[], Awaitable[None]]) -> None:
    """Make ``change`` happen while the storage call ``action`` waits for its reply."""
    run = streams.storage.run

    async def changing(op: Any, what: str, *details: object) -> Any:
        reply = await run(op, what, *details)
        if what == action:
            await change()
        return reply

    streams.storage.run = changing  # type: ignore[method-assign]


Change = Callable[[RedisStreams], Callable[[], Awaitable[None]]]


async def pending(raw: aioredis.Redis, streams: RedisStreams) -> int:
    summary = await raw.xpending(streams.keys.stream(0), CONSUMER_GROUP)
    return int(summary["pending"])


@pytest.mark.parametrize("change", [lost, handed_back], ids=["lost", "handed back"])
async def test_entries_read_while_their_partition_goes_are_left_pending_for_its_next_owner(
    streams: RedisStreams, raw: aioredis.Redis, change: Change
) -> None:
    await streams.send([Event("t", "s", {}, "e-1", "test", time.time())])
    during(streams, "read the partition streams", change(streams))

    deliveries = await streams.read(10, 100)

    assert deliveries == []
    assert await pending(raw, streams) == 1  # delivered to this consumer, not acknowledged


@pytest.mark.parametrize("change", [lost, handed_back], ids=["lost", "handed back"])
async def test_entries_reclaimed_while_their_partition_goes_are_left_pending_for_its_next_owner(
    streams: RedisStreams, raw: aioredis.Redis, change: Change
) -> None:
    await streams.send([Event("t", "s", {}, "e-1", "test", time.time())])
    (first,) = await streams.read(10, 100)  # read, never committed: left idle
    await raw.xclaim(streams.keys.stream(0), CONSUMER_GROUP, "reader", 0, [first.entry_id], idle=1000)
    during(streams, "reclaim idle entries", change(streams))

    deliveries = await streams.reclaim()

    assert deliveries == []
    assert await pending(raw, streams) == 1


async def test_a_reclaim_leaves_the_entries_still_worked_on_here_and_their_delivery_counts(
    streams: RedisStreams, raw: aioredis.Redis
) -> None:
    await streams.send([Event("t", f"s{i}", {}, f"e-{i}", "test", time.time()) for i in range(3)])
    busy, stuck, slow = await streams.read(10, 100)  # none committed; all idle past claim_idle_ms
    stream = streams.keys.stream(0)
    ids = [busy.entry_id, stuck.entry_id, slow.entry_id]
    await raw.xclaim(stream, CONSUMER_GROUP, "reader", 0, ids, idle=1000, justid=True)  # idle, not counted

    reclaimed = await streams.reclaim([(0, busy.entry_id), (0, slow.entry_id)])

    assert [d.entry_id for d in reclaimed] == [stuck.entry_id]
    assert reclaimed[0].deliveries == 2
    counts = {
        row["message_id"]: row["times_delivered"]
        for row in await raw.xpending_range(stream, CONSUMER_GROUP, "-", "+", 10)
    }
    assert counts == {busy.entry_id: 1, stuck.entry_id: 2, slow.entry_id: 1}
