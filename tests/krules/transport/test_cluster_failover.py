"""A Redis Cluster primary killed (kill -9) under a running Redis-mode instance: its replica takes
its slots over and krules carries on, with exact counts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis
from redis.crc import key_slot

from krules.context import EventContext
from krules.testing import RedisModeApp, wait_until
from krules.testing.redis_cluster import LocalRedisCluster

pytestmark = [pytest.mark.redis_server, pytest.mark.slow]


async def test_a_killed_primary_is_replaced_by_its_replica_and_every_event_counts_once(
    redis_cluster_factory: Callable[..., LocalRedisCluster], redis_key_prefix: str
) -> None:
    cluster = redis_cluster_factory()
    app = RedisModeApp(cluster.url, redis_key_prefix, partitions=4)

    @app.on("count.inc")
    async def count(ctx: EventContext) -> None:
        await ctx.subject.set("count", lambda n: (n or 0) + 1)

    await app.start()
    subjects = [f"s{i}" for i in range(8)]

    async def counted(expected: int) -> bool:
        return [await _count(app, name) for name in subjects] == [expected] * len(subjects)

    for name in subjects:
        await app.emit("count.inc", name)
    await wait_until(lambda: counted(1), timeout=30)

    victim = cluster.primary_of(key_slot(app.storage.keys.stream(0).encode()))
    with redis.Redis(port=victim.port) as client:  # what it acknowledged reached its replica
        assert client.execute_command("WAIT", 1, 5000) == 1
    victim.stop(kill=True)
    await asyncio.to_thread(cluster.wait_until_ok, 60.0, replicas=0)

    for name in subjects:
        await app.emit("count.inc", name)
    await wait_until(lambda: counted(2), timeout=60)
    await app.stop()
    assert cluster.primary_of(key_slot(app.storage.keys.stream(0).encode())) is not victim


async def _count(app: RedisModeApp, name: str) -> int | None:
    try:
        value: int = await app.storage.get(name, "count")
    except KeyError:
        return None
    return value
