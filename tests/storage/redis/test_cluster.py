"""The Redis storage on a real Redis Cluster (3 primaries, 3 replicas on loopback): routed by slot,
every node listed, redirects followed; and the cluster URL, routing and refusals on their own."""

from __future__ import annotations

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from krules.errors import ConfigurationError
from krules.testing.redis_cluster import LocalRedisCluster
from storage.redis import create_redis_storage
from storage.redis.cluster import parse_cluster_url, slot_of
from storage.redis.keys import KeySchema

# -- the URL and the routing, without a server ---------------------------------------------------


def test_a_cluster_url_names_its_seed_nodes_and_the_options_of_every_node() -> None:
    seeds, options = parse_cluster_url(
        "redis+cluster://app:secret@10.0.0.1:7000,10.0.0.2:7001/?socket_timeout=3"
    )
    assert seeds == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert (options["username"], options["password"], options["socket_timeout"]) == ("app", "secret", 3.0)


def test_a_cluster_url_with_a_database_other_than_0_is_refused_in_one_sentence() -> None:
    with pytest.raises(ConfigurationError, match=r"only database 0.*redis\+cluster://"):
        create_redis_storage("redis+cluster://127.0.0.1:7000/3")


def test_every_key_of_a_partition_routes_to_its_tag_slot() -> None:
    keys = KeySchema("app:", 12)
    tag_slot = key_slot(b"p5")
    stream, lease = keys.stream(5), keys.lease(5)
    assert slot_of(("EVALSHA", "sha", 2, lease, stream, "fence")) == tag_slot
    assert slot_of(("XREAD", "COUNT", 1, "BLOCK", 10, "STREAMS", stream, "0-0")) == tag_slot
    assert slot_of(("XINFO", "GROUPS", stream)) == tag_slot
    assert slot_of(("TIME",)) is None


def test_a_redis_py_cluster_client_is_refused_with_the_url_to_use() -> None:
    client = aioredis.RedisCluster(host="127.0.0.1", port=7000)
    with pytest.raises(ConfigurationError, match=r"redis\+cluster://"):
        create_redis_storage(client=client)


def test_a_fakeredis_client_is_still_welcome() -> None:
    assert create_redis_storage(client=fakeredis.FakeAsyncRedis()).commands.cluster is False


# -- on a real cluster -----------------------------------------------------------------------


@pytest.mark.redis_server
@pytest.mark.slow
async def test_subjects_of_every_primary_are_stored_and_listed(
    redis_cluster: LocalRedisCluster, redis_key_prefix: str
) -> None:
    storage = create_redis_storage(redis_cluster.url, key_prefix=redis_key_prefix, partitions=12)
    names = [f"sensor-{i}" for i in range(60)]
    for name in names:
        await storage.set(name, "reading", "1")
    assert await storage.subjects("sensor-") == sorted(names)
    holding = []
    for node in redis_cluster.primaries:
        with redis.Redis(port=node.port) as client:
            holding.append(len(list(client.scan_iter(match=f"{redis_key_prefix}*"))))
    assert len(holding) == 3 and all(holding)
    await storage.close()


@pytest.mark.redis_server
@pytest.mark.slow
async def test_a_slot_moved_to_another_node_is_followed(
    redis_cluster: LocalRedisCluster, redis_key_prefix: str
) -> None:
    storage = create_redis_storage(redis_cluster.url, key_prefix=redis_key_prefix, partitions=3)
    await storage.set("order-1", "status", '"new"')
    slot = key_slot(storage.keys.subject("order-1").encode())
    source = redis_cluster.primary_of(slot)
    target = next(node for node in redis_cluster.primaries if node is not source)
    redis_cluster.start_moving_slot(slot, target)
    redis_cluster.finish_moving_slot(slot, source, target)
    assert await storage.update("order-1", "status", lambda status: status + "-seen") == (
        "new-seen",
        "new",
        True,
    )
    assert redis_cluster.primary_of(slot) is target
    await storage.close()


@pytest.mark.redis_server
@pytest.mark.slow
async def test_a_slot_being_migrated_is_followed_with_asking(
    redis_cluster: LocalRedisCluster, redis_key_prefix: str
) -> None:
    storage = create_redis_storage(redis_cluster.url, key_prefix=redis_key_prefix, partitions=3)
    await storage.set("order-1", "status", '"new"')
    slot = key_slot(storage.keys.subject("order-1").encode())
    source = redis_cluster.primary_of(slot)
    target = next(node for node in redis_cluster.primaries if node is not source)
    redis_cluster.start_moving_slot(slot, target)
    try:
        neighbour = next(
            name
            for name in (f"order-{i}" for i in range(2, 1000))
            if key_slot(storage.keys.subject(name).encode()) == slot
        )
        await storage.set(neighbour, "status", '"new"')  # not on the source: asked of the target
        assert await storage.get("order-1", "status") == "new"
        assert await storage.get(neighbour, "status") == "new"
        with redis.Redis(port=target.port) as client:
            assert client.execute_command("ASKING") and client.exists(storage.keys.subject(neighbour))
    finally:
        redis_cluster.finish_moving_slot(slot, source, target)
    assert await storage.get(neighbour, "status") == "new"
    await storage.close()


@pytest.mark.redis_server
@pytest.mark.slow
async def test_a_single_node_url_on_a_cluster_says_to_use_the_cluster_url(
    redis_cluster: LocalRedisCluster, redis_key_prefix: str
) -> None:
    storage = create_redis_storage(
        f"redis://127.0.0.1:{redis_cluster.primaries[0].port}/0", key_prefix=redis_key_prefix, partitions=12
    )
    with pytest.raises(ConfigurationError, match=r"node of a Redis Cluster.*slot \d+.*redis\+cluster://"):
        for i in range(50):  # some subject lives on another node
            await storage.load(f"order-{i}")
    await storage.close()
