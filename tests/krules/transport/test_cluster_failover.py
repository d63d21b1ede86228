"""A Redis Cluster primary killed (kill -9) under a running Redis-mode instance: its replica takes
its slots over and krules carries on, with exact counts (KRULES_REDIS_WAIT_REPLICAS=1: nothing the
dead primary acknowledged was missing from its replica)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from redis.crc import key_slot

from krules.testing import wait_until
from krules.testing.redis_cluster import LocalRedisCluster
from tests.failover_counting import counted, counting_app, send_round

pytestmark = [pytest.mark.redis_server, pytest.mark.slow]


async def test_a_primary_killed_mid_run_is_replaced_by_its_replica_and_every_event_counts_once(
    redis_cluster_factory: Callable[..., LocalRedisCluster], redis_key_prefix: str
) -> None:
    cluster = redis_cluster_factory()
    app = counting_app(cluster.url, redis_key_prefix, partitions=4)
    await app.start()
    await send_round(app)
    await wait_until(lambda: counted(app, 1), timeout=30)

    slot = key_slot(app.storage.keys.stream(0).encode())
    victim = cluster.primary_of(slot)

    async def replaced() -> bool:
        return await asyncio.to_thread(cluster.primary_of, slot) is not victim

    await send_round(app)  # each append acknowledged by the replica of its stream's primary
    victim.stop(kill=True)  # while those are being processed and committed
    await wait_until(replaced, timeout=60)
    await asyncio.to_thread(cluster.wait_until_ok, 60.0, replicas=0)
    # The promoted replica has no replica of its own: its commits wait for one.  The dead node
    # (empty: nothing persisted) comes back as that replica, now that its slots are taken over.
    victim.start()
    await asyncio.to_thread(cluster.wait_until_ok, 60.0)

    await send_round(app)
    await wait_until(lambda: counted(app, 3), timeout=90)
    await app.stop()
    assert cluster.replicas_of(cluster.primary_of(slot)) == [victim]
