"""KRULES_REDIS_WAIT_REPLICAS: a commit is reported done only once the primary's replicas hold it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from krules.errors import StorageUnavailableError
from krules.partitioning import partition_of
from krules.testing import wait_until
from krules.testing.redis_server import LocalRedisServer
from storage.base import SubjectChanges
from storage.redis import create_redis_storage

pytestmark = pytest.mark.redis_server


@dataclass(frozen=True)
class Receipt:
    event_id: str
    partition: int = 0
    entry_id: str = ""
    fence: str = ""


def names_in(partition: int, n: int) -> list[str]:
    return [name for name in (f"order-{i}" for i in range(200)) if partition_of(name, 4) == partition][:n]


async def start_replica(
    start: Callable[..., LocalRedisServer], primary: LocalRedisServer
) -> LocalRedisServer:
    replica = start(options=("--replicaof", "127.0.0.1", str(primary.port)))
    async with aioredis.Redis(port=replica.port, decode_responses=True) as client:

        async def in_step() -> bool:
            return (await client.info("replication")).get("master_link_status") == "up"

        await wait_until(in_step, timeout=30)
    return replica


async def test_commits_made_together_run_once_with_one_wait_and_the_replica_holds_them(
    redis_server_factory: Callable[..., LocalRedisServer], redis_key_prefix: str
) -> None:
    primary = redis_server_factory()
    replica = await start_replica(redis_server_factory, primary)
    storage = create_redis_storage(primary.url, redis_key_prefix, partitions=4, wait_replicas=1)
    await storage.check()
    await storage.layout()
    names = names_in(0, 10)
    async with aioredis.Redis(port=primary.port, decode_responses=True) as raw:
        await raw.config_resetstat()

        committed = await asyncio.gather(
            *(
                storage.commit([SubjectChanges(name, {"status": '"paid"'})], Receipt(f"e-{name}"))
                for name in names
            )
        )

        calls = {name: int(stat["calls"]) for name, stat in (await raw.info("commandstats")).items()}
    assert committed == [True] * 10
    assert (calls["cmdstat_evalsha"], calls["cmdstat_wait"]) == (1, 1)
    async with aioredis.Redis(port=replica.port, decode_responses=True) as on_replica:
        assert [await on_replica.hget(storage.keys.subject(name), "p:status") for name in names] == [
            '"paid"'
        ] * 10
    await storage.close()


async def test_a_commit_no_replica_acknowledges_is_not_reported_done_and_its_retry_only_acknowledges(
    redis_server_factory: Callable[..., LocalRedisServer], redis_key_prefix: str
) -> None:
    primary = redis_server_factory()  # no replica yet
    storage = create_redis_storage(
        primary.url, redis_key_prefix, partitions=4, wait_replicas=1, wait_timeout_ms=50, retries=1
    )
    name = names_in(1, 1)[0]
    turn = [SubjectChanges(name, {"status": '"paid"'})]

    with pytest.raises(StorageUnavailableError, match="KRULES_REDIS_WAIT_REPLICAS"):
        await storage.commit(turn, Receipt("e-1", partition=1))

    replica = await start_replica(redis_server_factory, primary)
    assert await storage.commit(turn, Receipt("e-1", partition=1)) is False  # applied the first time
    async with aioredis.Redis(port=replica.port, decode_responses=True) as on_replica:
        assert await on_replica.hget(storage.keys.subject(name), "p:status") == '"paid"'
    await storage.close()


async def test_without_replicas_asked_for_no_wait_is_sent(
    redis_server: LocalRedisServer, raw: aioredis.Redis, redis_key_prefix: str
) -> None:
    storage = create_redis_storage(redis_server.url, redis_key_prefix, partitions=4)
    await storage.layout()
    await raw.config_resetstat()

    await storage.commit([SubjectChanges("order-1", {"status": '"paid"'})], Receipt("e-1", partition=0))

    assert "cmdstat_wait" not in await raw.info("commandstats")
    await storage.close()
