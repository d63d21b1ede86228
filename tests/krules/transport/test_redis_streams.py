"""The partition streams on a real redis-server and on a real Redis Cluster: turns committed with
their ack, dedupe, dead letters, forwarding, reclaiming, the partition count, the ingress, its
health and the client in Redis mode."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from krules.context import EventContext
from krules.dead_letters import DeadLetters
from krules.errors import ConfigurationError
from krules.events import Event
from krules.http.server import serve_in_background
from krules.partitioning import partition_of
from krules.testing import RedisModeApp, wait_until
from krules.testing.redis_cluster import LocalRedisCluster
from krules.testing.redis_server import LocalRedisServer
from krules.transport.redis_streams import RedisStreams, connect_streams
from krules.transport.stream_client import AsyncStreamClient
from storage.redis import RedisStorage, create_redis_storage
from storage.redis.keys import CONSUMER_GROUP

pytestmark = pytest.mark.redis_server


class Instance(RedisModeApp):
    """A Redis-mode app with its streams at hand."""

    @property
    def streams(self) -> RedisStreams:
        source = self.worker.source
        assert isinstance(source, RedisStreams)
        return source


@pytest.fixture(params=["redis-server", pytest.param("redis-cluster", marks=pytest.mark.slow)])
def deployment_url(request: pytest.FixtureRequest) -> str:
    """Each test runs on the session's redis-server and again on its Redis Cluster."""
    if request.param == "redis-server":
        server: LocalRedisServer = request.getfixturevalue("redis_server")
        return server.url
    cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
    return cluster.url


@pytest.fixture
async def raw(deployment_url: str) -> AsyncIterator[Any]:
    """A plain redis-py client of the deployment (a RedisCluster on the cluster), replies decoded."""
    if deployment_url.startswith("redis+cluster://"):
        seed = deployment_url.removeprefix("redis+cluster://").split(",")[0]
        client: Any = aioredis.RedisCluster.from_url(f"redis://{seed}", decode_responses=True)
    else:
        client = aioredis.Redis.from_url(deployment_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def make_instance(deployment_url: str, redis_key_prefix: str) -> AsyncIterator[Callable[..., Instance]]:
    made: list[Instance] = []

    def make(**settings: Any) -> Instance:
        instance = Instance(deployment_url, redis_key_prefix, **settings)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        await instance.stop()


eventually = wait_until


def counting(instance: Instance, event_type: str = "count.inc") -> None:
    @instance.on(event_type)
    async def count(ctx: EventContext) -> None:
        await ctx.subject.set("count", lambda n: (n or 0) + 1)
        other = ctx.payload.get("total")
        if other:
            await ctx.emit("count.total", {}, subject=other)

    @instance.on("count.total")
    async def total(ctx: EventContext) -> None:
        await ctx.subject.set("count", lambda n: (n or 0) + 1)


async def count_of(storage: RedisStorage, name: str) -> int | None:
    try:
        value: int = await storage.get(name, "count")
    except KeyError:
        return None
    return value


def subjects_in(partition: int, partitions: int, n: int, stem: str = "s") -> list[str]:
    found = []
    i = 0
    while len(found) < n:
        if partition_of(f"{stem}{i}", partitions) == partition:
            found.append(f"{stem}{i}")
        i += 1
    return found


async def test_events_sent_to_the_streams_are_each_counted_once(
    make_instance: Callable[..., Instance],
) -> None:
    instance = make_instance()
    counting(instance)
    await instance.start()
    for i in range(60):
        await instance.emit("count.inc", f"s{i % 6}", {"total": f"t{i % 4}"})

    async def all_counted() -> bool:
        counts = [await count_of(instance.storage, f"s{i}") for i in range(6)]
        totals = [await count_of(instance.storage, f"t{i}") for i in range(4)]
        return counts == [10] * 6 and totals == [15] * 4

    await eventually(all_counted)
    await instance.engine.settled()
    assert await count_of(instance.storage, "s0") == 10


async def test_events_of_twelve_partitions_are_each_counted_once_wherever_their_streams_live(
    make_instance: Callable[..., Instance],
) -> None:
    instance = make_instance(partitions=12)  # on the cluster: streams on every primary
    counting(instance)
    await instance.start()
    subjects = [f"s{i}" for i in range(24)]
    for round_ in range(5):
        for name in subjects:
            await instance.emit("count.inc", name, {"total": f"t{round_}"})

    async def all_counted() -> bool:
        counts = [await count_of(instance.storage, name) for name in subjects]
        totals = [await count_of(instance.storage, f"t{i}") for i in range(5)]
        return counts == [5] * 24 and totals == [24] * 5

    await eventually(all_counted)
    await instance.engine.settled()
    assert sorted(await instance.storage.subjects("s")) == sorted(subjects)


async def test_a_commit_acknowledges_the_entry_and_records_the_event_as_processed(
    make_instance: Callable[..., Instance], raw: Any
) -> None:
    instance = make_instance(partitions=1)
    counting(instance)
    await instance.start()
    await instance.emit("count.inc", "s1")
    await eventually(lambda: _equals(count_of(instance.storage, "s1"), 1))
    keys = instance.storage.keys
    await eventually(lambda: _pending_is(raw, keys.stream(0), 0))
    assert await raw.zcard(keys.processed(0)) == 1


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


async def _pending_is(raw: Any, stream: str, expected: int) -> bool:
    summary = await raw.xpending(stream, CONSUMER_GROUP)
    return bool(summary["pending"] == expected)


async def test_the_same_event_sent_twice_is_applied_once(make_instance: Callable[..., Instance]) -> None:
    instance = make_instance()
    counting(instance)
    await instance.start()
    event = instance.engine.new_event("count.inc", "twice", {})
    await instance.streams.send([event])
    await instance.streams.send([event])  # e.g. a client retrying after a lost reply
    await eventually(lambda: _equals(count_of(instance.storage, "twice"), 1))
    await eventually(lambda: _worker_processed(instance, 1), timeout=5)
    await asyncio.sleep(0.2)  # a duplicate processed late would show now
    assert await count_of(instance.storage, "twice") == 1


async def _worker_processed(instance: Instance, at_least: int) -> bool:
    return instance.worker.processed >= at_least


async def test_a_commit_of_an_event_committed_before_writes_nothing(
    make_instance: Callable[..., Instance],
) -> None:
    from krules.transport.redis_streams import StreamReceipt
    from storage.base import SubjectChanges

    instance = make_instance(partitions=1)
    await instance.streams.check_partition_count()
    receipt = StreamReceipt(instance.storage, 0, "event-1", "")
    first = await instance.storage.commit([SubjectChanges("c", {"p:x": "1"})], receipt)
    second = await instance.storage.commit([SubjectChanges("c", {"p:x": "2"})], receipt)
    assert (first, second) == (True, False)
    props, _ = await instance.storage.load("c")
    assert props == {"p:x": 1}


async def test_an_entry_that_is_not_an_event_is_dead_lettered_with_the_reason(
    make_instance: Callable[..., Instance], raw: Any
) -> None:
    instance = make_instance(partitions=1)
    counting(instance)
    await instance.start()
    keys = instance.storage.keys
    await raw.xadd(keys.stream(0), {"event": "{not json"})
    await raw.xadd(keys.stream(0), {"something": "else"})
    await raw.xadd(keys.stream(0), {"event": json.dumps({"specversion": "1.0", "id": "x", "type": "t"})})
    await instance.emit("count.inc", "after")  # the stream goes on after them
    await eventually(lambda: _equals(count_of(instance.storage, "after"), 1))
    await eventually(lambda: _dead_letters_are(instance, 3))
    parked = sorted(await DeadLetters(instance.storage).list(), key=lambda r: _stream_order(r.entry_id))
    assert [record.reason for record in parked] == ["invalid_event"] * 3
    assert [record.handler for record in parked] == [""] * 3
    assert "not valid JSON" in parked[0].error["message"]
    assert parked[0].event == {"event": "{not json"}  # the original entry is kept
    assert "no 'event' field" in parked[1].error["message"]
    assert parked[1].event == {"something": "else"}
    assert "'source'" in parked[2].error["message"]
    assert (parked[2].event_id, parked[2].event_type) == ("x", "t")  # what could be read of it
    assert {record.partition for record in parked} == {0}
    await eventually(lambda: _pending_is(raw, keys.stream(0), 0))


async def _dead_letters_are(instance: Instance, expected: int) -> bool:
    return len(await DeadLetters(instance.storage).list()) == expected


def _stream_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


async def test_an_entry_delivered_too_often_is_dead_lettered_instead_of_looping(
    make_instance: Callable[..., Instance], raw: Any
) -> None:
    instance = make_instance(partitions=1, max_deliveries=2)
    counting(instance)
    keys = instance.storage.keys
    await instance.streams.check_partition_count()
    await raw.xgroup_create(keys.stream(0), CONSUMER_GROUP, "0", mkstream=True)
    event = Event("count.inc", "poison", {}, "poison-1", "test", time.time())
    await instance.streams.send([event])
    # Two consumers took it and died (the second reclaimed it from the first).
    await raw.xreadgroup(CONSUMER_GROUP, "crashed-a", {keys.stream(0): ">"}, count=1)
    await raw.xautoclaim(keys.stream(0), CONSUMER_GROUP, "crashed-b", 0, "0-0")
    await instance.start()
    await eventually(lambda: _dead_letters_are(instance, 1))
    (parked,) = await DeadLetters(instance.storage).list()
    assert parked.reason == "max_deliveries"
    assert parked.attempts == 3  # the deliveries
    assert (parked.event_id, parked.subject, parked.handler) == ("poison-1", "poison", "")
    assert parked.event["id"] == "poison-1" and parked.event["type"] == "count.inc"
    assert await count_of(instance.storage, "poison") is None
    await eventually(lambda: _pending_is(raw, keys.stream(0), 0))


async def test_entries_a_dead_consumer_left_pending_are_reclaimed_and_processed(
    make_instance: Callable[..., Instance], raw: Any
) -> None:
    instance = make_instance(partitions=1, claim_idle_ms=200)
    counting(instance)
    keys = instance.storage.keys
    await instance.streams.check_partition_count()
    await raw.xgroup_create(keys.stream(0), CONSUMER_GROUP, "0", mkstream=True)
    await instance.streams.send([instance.engine.new_event("count.inc", f"r{i}", {}) for i in range(5)])
    taken = await raw.xreadgroup(CONSUMER_GROUP, "dead-consumer", {keys.stream(0): ">"}, count=5)
    assert len(taken[0][1]) == 5
    await instance.start()

    async def all_counted() -> bool:
        return [await count_of(instance.storage, f"r{i}") for i in range(5)] == [1] * 5

    await eventually(all_counted)
    await eventually(lambda: _pending_is(raw, keys.stream(0), 0))


async def test_an_entry_in_the_wrong_partition_is_forwarded_once_and_processed_by_its_owner(
    make_instance: Callable[..., Instance], raw: Any
) -> None:
    instance = make_instance(partitions=2)
    counting(instance)
    await instance.start()
    keys = instance.storage.keys
    (name,) = subjects_in(1, 2, 1)
    event = Event("count.inc", name, {}, "misrouted-1", "other-service", time.time())
    await raw.xadd(keys.stream(0), {"event": json.dumps(event.to_dict())})  # a wrong partition
    await eventually(lambda: _equals(count_of(instance.storage, name), 1))
    forwarded = await raw.xrange(keys.stream(1))
    assert [fields.get("hops") for _, fields in forwarded] == ["1"]
    # An entry that was forwarded already and is still misplaced is parked, not bounced again.
    await raw.xadd(keys.stream(0), {"event": json.dumps(event.to_dict()), "hops": "1"})
    await eventually(lambda: _dead_letters_are(instance, 1))
    (parked,) = await DeadLetters(instance.storage).list()
    assert (parked.reason, parked.partition, parked.event_id) == ("misrouted", 0, "misrouted-1")
    await eventually(lambda: _pending_is(raw, keys.stream(0), 0))


async def test_an_emit_to_another_partition_goes_through_its_stream_with_a_derived_id(
    make_instance: Callable[..., Instance], raw: Any
) -> None:
    instance = make_instance(partitions=2)
    counting(instance)
    await instance.start()
    (here,) = subjects_in(0, 2, 1)
    (there,) = subjects_in(1, 2, 1, stem="t")
    await instance.emit("count.inc", here, {"total": there})
    await eventually(lambda: _equals(count_of(instance.storage, there), 1))
    entries = await raw.xrange(instance.storage.keys.stream(1))
    ids = [json.loads(fields["event"])["id"] for _, fields in entries]
    root_ids = [json.loads(f["event"])["id"] for _, f in await raw.xrange(instance.storage.keys.stream(0))]
    assert len(ids) == 1 and ids[0].startswith(root_ids[0] + ".")


async def test_a_turn_re_run_after_a_crash_sends_its_cross_partition_events_again_and_they_count_once(
    make_instance: Callable[..., Instance],
) -> None:
    instance = make_instance(partitions=2)
    counting(instance)
    await instance.start()
    (there,) = subjects_in(1, 2, 1, stem="t")
    root = instance.engine.new_event("count.total", there, {})
    child = Event("count.total", there, {}, None, "krules", time.time(), 1, root, None, 1, "abc123")
    await instance.streams.send([child])
    await instance.streams.send([child])  # the re-run of the emitting turn sends the same id
    await eventually(lambda: _equals(count_of(instance.storage, there), 1))
    await asyncio.sleep(0.2)
    assert await count_of(instance.storage, there) == 1


async def test_an_instance_with_another_partition_count_refuses_to_start(
    make_instance: Callable[..., Instance],
) -> None:
    first = make_instance(partitions=2)
    await first.start()
    with pytest.raises(ConfigurationError, match=r"has 2 partitions.*KRULES_PARTITIONS=3"):
        make_instance(partitions=3)  # assembling it reads the recorded count


async def test_instances_take_only_the_partitions_they_own(make_instance: Callable[..., Instance]) -> None:
    handled: dict[str, set[str]] = {"0": set(), "1": set()}
    instances = []
    for owned in ("0", "1"):
        instance = make_instance(partitions=2, partition_id=owned, consumer=f"c{owned}")

        def register(instance: Instance, owned: str) -> None:
            @instance.on("count.inc")
            async def note(ctx: EventContext) -> None:
                handled[owned].add(ctx.subject.name)
                await ctx.subject.set("count", lambda n: (n or 0) + 1)

        register(instance, owned)
        instances.append(instance)
    for instance in instances:
        await instance.start()
    names = [f"s{i}" for i in range(20)]
    for name in names:
        await instances[0].emit("count.inc", name)

    async def all_counted() -> bool:
        return all([await count_of(instances[0].storage, n) == 1 for n in names])

    await eventually(all_counted)
    assert handled["0"] | handled["1"] == set(names)
    assert all(partition_of(n, 2) == 0 for n in handled["0"])
    assert all(partition_of(n, 2) == 1 for n in handled["1"])
    status = await instances[0].streams.status()
    assert [[o["consumer"] for o in p["owners"]] for p in status] == [["c0"], ["c1"]]


async def test_stopping_lets_the_turns_under_way_commit(
    make_instance: Callable[..., Instance], raw: Any
) -> None:
    instance = make_instance(partitions=1)
    started = asyncio.Event()
    release = asyncio.Event()

    @instance.on("slow")
    async def slow(ctx: EventContext) -> None:
        started.set()
        await release.wait()
        await ctx.subject.set("done", True)

    await instance.start()
    await instance.emit("slow", "slow-1")
    await asyncio.wait_for(started.wait(), 5)
    instance.worker.stop()
    release.set()
    await instance.stop()
    assert await raw.hget(instance.storage.keys.subject("slow-1"), "p:done") == "true"
    assert (await raw.xpending(instance.storage.keys.stream(0), CONSUMER_GROUP))["pending"] == 0


async def test_the_ingress_queues_events_on_the_streams_and_answers_202(
    make_instance: Callable[..., Instance],
) -> None:
    instance = make_instance(partitions=2)
    counting(instance)
    await instance.start()
    async with serve_in_background(instance.engine) as server, httpx.AsyncClient() as http:
        body = [
            {
                "specversion": "1.0",
                "id": f"http-{i}",
                "source": "test",
                "type": "count.inc",
                "subject": f"h{i}",
            }
            for i in range(4)
        ]
        response = await http.post(
            f"{server.url}/events",
            content=json.dumps(body),
            headers={"content-type": "application/cloudevents-batch+json"},
        )
        assert response.status_code == 202
        assert response.json() == {"accepted": 4, "ids": [f"http-{i}" for i in range(4)], "queued": True}

        async def all_counted() -> bool:
            return [await count_of(instance.storage, f"h{i}") for i in range(4)] == [1] * 4

        await eventually(all_counted)
        await instance.stop()  # the worker before the engine, as krules run does


async def test_the_stream_client_needs_a_started_deployment_and_then_queues_events(
    deployment_url: str, redis_key_prefix: str, make_instance: Callable[..., Instance]
) -> None:
    async with AsyncStreamClient(deployment_url, redis_key_prefix) as client:
        with pytest.raises(ConfigurationError, match="No krules instance has started"):
            await client.emit("count.inc", "c1")
    instance = make_instance(partitions=3)
    counting(instance)
    await instance.start()
    async with AsyncStreamClient(deployment_url, redis_key_prefix) as client:
        event_id = await client.emit("count.inc", "c1")
        ids = await client.emit_batch([{"type": "count.inc", "subject": f"c{i}"} for i in range(2, 5)])
    assert len({event_id, *ids}) == 4

    async def all_counted() -> bool:
        return [await count_of(instance.storage, f"c{i}") for i in range(1, 5)] == [1] * 4

    await eventually(all_counted)


async def test_connect_streams_reads_the_recorded_partition_count(
    deployment_url: str, redis_key_prefix: str, make_instance: Callable[..., Instance]
) -> None:
    instance = make_instance(partitions=5)
    await instance.streams.check_partition_count()
    storage = create_redis_storage(deployment_url, redis_key_prefix)
    try:
        streams = await connect_streams(storage)
        assert streams.keys.partitions == 5
    finally:
        await storage.close()


async def test_healthz_fails_while_the_partitions_cannot_be_read_and_recovers_after(
    make_instance: Callable[..., Instance], raw: Any
) -> None:
    instance = make_instance(partitions=1)
    counting(instance)
    await instance.start()
    stream = instance.storage.keys.stream(0)
    async with serve_in_background(instance.engine) as http_server, httpx.AsyncClient() as http:

        async def health_is(expected: int) -> bool:
            return (await http.get(f"{http_server.url}/healthz")).status_code == expected

        assert await health_is(200)
        await raw.delete(stream)
        await raw.set(stream, "not a stream")  # every read of the partition now fails
        await eventually(lambda: health_is(503))
        reason = (await http.get(f"{http_server.url}/healthz")).json()["reason"]
        assert reason.startswith("This instance cannot read its partitions: Redis at ")
        await raw.delete(stream)  # the partition's stream and group are made again
        await eventually(lambda: health_is(200))
        await instance.stop()
