"""Bounded partition streams on a real redis-server: upkeep trims every processed entry however many
there are, and never one still needed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from krules.assembly import assemble
from krules.config import Settings
from krules.context import EventContext
from krules.testing import wait_until
from krules.testing.redis_server import LocalRedisServer
from krules.transport.redis_leases import PartitionLeases
from krules.transport.redis_streams import RedisStreams
from krules.transport.stream_client import AsyncStreamClient
from storage.redis import create_redis_storage
from storage.redis.keys import CONSUMER_GROUP

pytestmark = pytest.mark.redis_server

NODE = 100
"""Entries of one stream node (Redis' ``stream-node-max-entries``): approximate trimming keeps
the node holding the oldest entry still needed."""


@pytest.fixture
async def streams(redis_server: LocalRedisServer, redis_key_prefix: str) -> AsyncIterator[RedisStreams]:
    """The streams of an instance owning partition 0 of 1, opened (its group exists), no worker."""
    storage = create_redis_storage(redis_server.url, redis_key_prefix)
    streams = RedisStreams(storage, leases=PartitionLeases(storage, name="trimmer", wanted=(0,)))
    await streams.open()
    yield streams
    await streams.close()
    await storage.close()


async def append(raw: aioredis.Redis, stream: str, count: int) -> list[str]:
    """Append ``count`` entries in pipelined chunks; their ids."""
    ids: list[str] = []
    for start in range(0, count, 5000):
        async with raw.pipeline(transaction=False) as pipe:
            for i in range(start, min(count, start + 5000)):
                pipe.xadd(stream, {"event": f'{{"n": {i}}}'})
            ids += await pipe.execute()
    return ids


async def deliver(raw: aioredis.Redis, stream: str, count: int) -> list[str]:
    """Deliver the next ``count`` entries to a consumer of the group; their ids (left pending)."""
    reply = await raw.xreadgroup(CONSUMER_GROUP, "worker", {stream: ">"}, count=count)
    return [entry_id for entry_id, _ in reply[0][1]] if reply else []


async def test_one_upkeep_trims_more_than_ten_thousand_processed_entries_to_the_last_node(
    raw: aioredis.Redis, streams: RedisStreams
) -> None:
    stream = streams.keys.stream(0)
    ids = await append(raw, stream, 25_000)
    delivered = await deliver(raw, stream, 25_000)
    assert delivered == ids
    for start in range(0, len(ids), 5000):
        await raw.xack(stream, CONSUMER_GROUP, *ids[start : start + 5000])

    figures = (await streams.maintain())[0]

    length = await raw.xlen(stream)
    assert length <= NODE, f"{length} entries left after one upkeep"
    assert figures.length == length
    assert figures.trimmed == 25_000 - length
    assert (figures.lag, figures.pending) == (0, 0)


async def test_trimming_keeps_every_entry_still_pending_or_not_yet_delivered(
    raw: aioredis.Redis, streams: RedisStreams
) -> None:
    stream = streams.keys.stream(0)
    processed = await append(raw, stream, 12_000)
    await deliver(raw, stream, 12_000)
    for start in range(0, len(processed), 5000):
        await raw.xack(stream, CONSUMER_GROUP, *processed[start : start + 5000])
    pending = await append(raw, stream, 300)
    await deliver(raw, stream, 300)  # delivered, never acknowledged: a consumer is on them
    undelivered = await append(raw, stream, 500)

    figures = (await streams.maintain())[0]

    left = [entry_id for entry_id, _ in await raw.xrange(stream)]
    assert left[-800:] == pending + undelivered
    assert len(left) - 800 <= NODE, f"{len(left) - 800} processed entries left after one upkeep"
    assert (figures.lag, figures.pending, figures.length) == (500, 300, len(left))


async def test_upkeep_exports_each_streams_length_and_trimmed_entries_as_metrics(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    settings = Settings(redis_url=redis_server.url, key_prefix=redis_key_prefix, claim_idle_ms=200)
    instance = assemble(settings)  # the default chain, with its metrics
    on, _, _, _ = instance.container.handlers()

    @on("tick")
    async def tick(ctx: EventContext) -> None:
        await ctx.subject.set("seen", True)

    assert instance.worker is not None and instance.chain is not None and instance.chain.metrics is not None
    sample = instance.chain.metrics.registry.get_sample_value
    await instance.engine.start()
    worker = asyncio.ensure_future(instance.worker.run())
    try:
        async with AsyncStreamClient(redis_server.url, redis_key_prefix) as client:
            await client.emit_batch([{"type": "tick", "subject": f"s{i}"} for i in range(600)])

        async def trimmed() -> bool:
            return (sample("krules_stream_trimmed_total", {"partition": "0"}) or 0) >= 600 - NODE

        await wait_until(trimmed, timeout=30)
        length = sample("krules_stream_length", {"partition": "0"})
        assert length is not None and length <= NODE
    finally:
        instance.worker.stop()
        await worker
        await instance.engine.close()
