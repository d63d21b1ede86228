"""Partition leases on a real redis-server, instances in this process: one owner per partition, an
even and sticky share in ``auto``, static ids waiting, and the fence refusing every write of an
instance that lost its lease (the commit, writes to other partitions, sends, reads)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from krules.config import Settings
from krules.context import EventContext
from krules.errors import ConfigurationError, LeaseLostError
from krules.events import Event
from krules.partitioning import partition_of
from krules.testing import RedisModeApp, wait_until
from krules.testing.redis_server import LocalRedisServer
from krules.transport.base import Delivery
from krules.transport.redis_leases import PartitionLeases, fair_shares
from krules.transport.redis_status import live_instances
from krules.transport.redis_streams import RedisStreams
from storage.base import SubjectChanges
from storage.redis import RedisStorage, create_redis_storage
from storage.redis.keys import lease_epoch, lease_holder

pytestmark = pytest.mark.redis_server

FAST = {"lease_ms": 1000, "lease_renew_ms": 100}
"""Short leases, so the tests see takeovers in a second (the defaults are 10 s and 1 s)."""


def counting(instance: RedisModeApp) -> None:
    """Give ``instance`` the rule every test here counts events with: ``count.inc`` adds one."""

    @instance.on("count.inc")
    async def count(ctx: EventContext) -> None:
        await ctx.subject.set("count", lambda n: (n or 0) + 1)


class Instance(RedisModeApp):
    @property
    def streams(self) -> RedisStreams:
        source = self.worker.source
        assert isinstance(source, RedisStreams)
        return source

    @property
    def leases(self) -> PartitionLeases:
        leases = self.streams.leases
        assert leases is not None
        return leases


@pytest.fixture
async def make_instance(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> AsyncIterator[Callable[..., Instance]]:
    made: list[Instance] = []

    def make(**settings: Any) -> Instance:
        instance = Instance(redis_server.url, redis_key_prefix, **{**FAST, **settings})
        made.append(instance)
        return instance

    yield make
    for instance in made:
        await instance.stop()


async def lease_holders(raw: aioredis.Redis, storage: RedisStorage) -> list[str | None]:
    """Each partition's lease holder (the instance name), read from its lease key."""
    keys = storage.keys
    values = [await raw.get(keys.lease(p)) for p in range(keys.partitions)]
    return [None if v is None else lease_holder(v) for v in values]


def test_fair_shares_are_even_and_leave_the_larger_ones_where_they_are() -> None:
    assert fair_shares(["a", "b", "c"], 8, {}) == {"a": 3, "b": 3, "c": 2}
    assert fair_shares(["a", "b", "c"], 8, {"c": 3, "b": 3}) == {"b": 3, "c": 3, "a": 2}
    assert fair_shares(["a", "b"], 1, {"b": 1}) == {"b": 1, "a": 0}
    assert fair_shares([], 4, {}) == {}


async def test_one_auto_instance_owns_every_partition_and_a_second_takes_half(
    make_instance: Callable[..., Instance], raw: aioredis.Redis
) -> None:
    first = make_instance(partitions=4, consumer="first")
    await first.start()
    await wait_until(lambda: _equals(lease_holders(raw, first.storage), ["first"] * 4))
    second = make_instance(partitions=4, consumer="second")
    await second.start()

    async def split_evenly() -> bool:
        holders = await lease_holders(raw, first.storage)
        return sorted(holders, key=str) == ["first", "first", "second", "second"]

    await wait_until(split_evenly)
    assert set(first.streams.partitions).isdisjoint(second.streams.partitions)
    await second.stop()  # a clean stop hands its partitions back at once
    await wait_until(lambda: _equals(lease_holders(raw, first.storage), ["first"] * 4))


async def test_instances_in_auto_count_every_event_once_whoever_owns_its_partition(
    make_instance: Callable[..., Instance],
) -> None:
    instances = [make_instance(partitions=4, consumer=f"i{n}") for n in range(3)]
    for instance in instances:
        counting(instance)
        await instance.start()
    names = [f"s{i}" for i in range(40)]
    for sender in (instances[0], instances[1], instances[2]):
        for name in names:
            await sender.emit("count.inc", name)
    await instances[2].stop()  # a clean stop mid-stream: its partitions go to the others
    for name in names:
        await instances[0].emit("count.inc", name)

    async def all_counted() -> bool:
        return all([await _count(instances[0].storage, n) == 4 for n in names])

    await wait_until(all_counted, 20)


async def test_two_instances_asking_for_the_same_static_id_never_share_it(
    make_instance: Callable[..., Instance], raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="krules.partitions")
    owner = make_instance(partitions=2, partition_id="0", consumer="owner")
    await owner.start()
    await wait_until(lambda: _equals(owner.streams.partitions, (0,)))
    waiter = make_instance(partitions=2, partition_id="0", consumer="waiter")
    await waiter.start()
    await wait_until(lambda: _true("waiting for partition 0, owned by instance 'owner'" in caplog.text))
    assert waiter.streams.partitions == ()
    status = await owner.streams.status()
    assert status[0]["owner"]["instance"] == "owner" and status[0]["waiting"] == ["waiter"]
    await owner.stop()
    await wait_until(lambda: _equals(waiter.streams.partitions, (0,)))
    assert (await lease_holders(raw, owner.storage))[0] == "waiter"


async def test_a_commit_under_a_lease_that_is_gone_is_refused_and_writes_nothing(
    make_instance: Callable[..., Instance], raw: aioredis.Redis
) -> None:
    instance = make_instance(partitions=1, consumer="old")
    await instance.start()
    await wait_until(lambda: _equals(instance.streams.partitions, (0,)))
    fence = instance.leases.fence(0)
    stale = f"{lease_epoch(fence)}:someone:else"  # the epoch of a lease that is no longer held
    delivery = Delivery(0, "1-0", {}, None, fence=stale)
    receipt = instance.streams.receipt(delivery, "event-1")

    with pytest.raises(LeaseLostError, match="Partition 0's lease is no longer this instance's"):
        await receipt.commit([SubjectChanges("s1", {"x": "1"})])

    assert await raw.exists(instance.storage.keys.subject("s1")) == 0
    assert await raw.zscore(instance.storage.keys.processed(0), "event-1") is None


async def test_writes_to_other_partitions_and_sends_of_an_older_owner_are_refused(
    make_instance: Callable[..., Instance], raw: aioredis.Redis
) -> None:
    instance = make_instance(partitions=2, consumer="owner")
    await instance.start()
    await wait_until(lambda: _equals(instance.streams.partitions, (0, 1)))
    keys = instance.storage.keys
    epoch = lease_epoch(instance.leases.fence(0))
    older = f"{epoch - 1}:gone:0000"  # the lease an earlier owner of partition 0 held
    there = next(f"t{i}" for i in range(100) if partition_of(f"t{i}", 2) == 1)
    receipt = instance.streams.receipt(Delivery(0, "1-0", {}, None, fence=older), "event-2")

    with pytest.raises(LeaseLostError):
        await receipt.commit([SubjectChanges(there, {"x": "1"})])
    with pytest.raises(LeaseLostError):
        await instance.streams.send([Event("e", there, {}, "ev-1", "test", time.time())], receipt)

    assert await raw.exists(keys.subject(there)) == 0
    assert await raw.xlen(keys.stream(1)) == 0


async def test_an_instance_whose_lease_was_taken_stops_reading_and_hands_the_partition_back(
    make_instance: Callable[..., Instance], raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="krules.partitions")
    instance = make_instance(partitions=1, consumer="paused", partition_id="0")
    await instance.start()
    await wait_until(lambda: _equals(instance.streams.partitions, (0,)))
    keys = instance.storage.keys
    # Another instance took the partition (as if this one had been paused past its lease).
    await raw.set(keys.lease(0), f"{int(time.time() * 1000) + 10_000}:thief:0000", px=60_000)

    await wait_until(lambda: _equals(instance.streams.partitions, ()))
    assert "lost partition 0: its lease is" in caplog.text
    assert await raw.get(keys.lease(0)) is not None  # not its to release


async def test_lease_keys_lost_by_redis_are_taken_again_with_a_newer_epoch(
    make_instance: Callable[..., Instance], raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="krules.partitions")
    instance = make_instance(partitions=2, consumer="survivor")

    counting(instance)

    await instance.start()
    await wait_until(lambda: _equals(instance.streams.partitions, (0, 1)))
    epochs = [lease_epoch(instance.leases.fence(p)) for p in (0, 1)]
    keys = instance.storage.keys
    await raw.delete(*(keys.lease(p) for p in (0, 1)), *(keys.fences(p) for p in (0, 1)))

    async def retaken() -> bool:
        fences = [instance.leases.fence(p) for p in (0, 1)]
        return all(fences) and all(lease_epoch(f) > e for f, e in zip(fences, epochs, strict=True))

    await wait_until(retaken)
    assert "lost partition" in caplog.text
    await instance.emit("count.inc", "after")
    await wait_until(lambda: _equals(_count(instance.storage, "after"), 1))


async def test_a_storage_opened_without_a_partition_count_uses_the_recorded_one(
    make_instance: Callable[..., Instance], redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    instance = make_instance(partitions=4)

    @instance.on("copy")
    async def copy(ctx: EventContext) -> None:
        await ctx.subject.set("copied", await ctx.subject.get("given"))

    await instance.start()
    outside = create_redis_storage(redis_server.url, redis_key_prefix)
    wrong = create_redis_storage(redis_server.url, redis_key_prefix, partitions=2)
    try:
        names = [f"user-{i}" for i in range(12)]
        for name in names:
            await outside.set(name, "given", f'"{name}"')
            await instance.emit("copy", name)

        async def all_copied() -> bool:
            return all([await _get(outside, n, "copied") == n for n in names])

        await wait_until(all_copied)
        assert outside.keys.partitions == 4
        assert sorted(await outside.subjects("user-")) == sorted(names)
        with pytest.raises(
            ConfigurationError, match="has 4 partitions, but this storage was opened with partitions=2"
        ):
            await wrong.get("user-1", "given")
    finally:
        await outside.close()
        await wrong.close()


async def test_with_nothing_recorded_reads_do_not_record_a_count_and_the_first_write_does(
    redis_server: LocalRedisServer, redis_key_prefix: str, raw: aioredis.Redis
) -> None:
    storage = create_redis_storage(redis_server.url, redis_key_prefix, partitions=3)
    try:
        assert await storage.subjects() == []
        assert await raw.get(storage.keys.partition_count()) is None
        await storage.set("first", "x", "1")
        assert await raw.get(storage.keys.partition_count()) == "3"
    finally:
        await storage.close()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KRULES_PARTITION_ID": "some"}, "KRULES_PARTITION_ID='some' is not a partition id"),
        ({"KRULES_PARTITIONS": "2", "KRULES_PARTITION_ID": "3"}, "names partition 3, but there are only 2"),
        ({"KRULES_LEASE_MS": "1000", "KRULES_LEASE_RENEW_MS": "800"}, "must be at least twice"),
    ],
)
def test_bad_ownership_settings_are_one_sentence(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(env)


# -- helpers -----------------------------------------------------------------------------------
async def _count(storage: RedisStorage, name: str) -> int | None:
    return await _get(storage, name, "count")


async def _get(storage: RedisStorage, name: str, prop: str) -> Any:
    try:
        return await storage.get(name, prop)
    except KeyError:
        return None


async def _equals(value: Any, expected: Any) -> bool:
    if asyncio.iscoroutine(value):
        value = await value
    return bool(value == expected)


async def _true(value: bool) -> bool:
    return value


async def test_an_instance_whose_redis_lost_every_key_records_the_count_again_and_goes_on(
    make_instance: Callable[..., Instance], raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="krules.partitions")
    instance = make_instance(partitions=2, consumer="amnesiac")

    counting(instance)

    await instance.start()
    await instance.emit("count.inc", "before")
    await wait_until(lambda: _equals(_count(instance.storage, "before"), 1))
    keys = instance.storage.keys
    await raw.delete(*[key async for key in raw.scan_iter(match=f"{keys.prefix}*")])  # a restart without data

    await wait_until(lambda: _equals(raw.get(keys.partition_count()), "2"))
    await wait_until(lambda: _equals(instance.streams.partitions, (0, 1)))
    assert "recorded it again (2)" in caplog.text
    for name in ("after-1", "after-2", "after-3"):
        await instance.emit("count.inc", name)

    async def counted() -> bool:
        return [await _count(instance.storage, n) for n in ("after-1", "after-2", "after-3")] == [1, 1, 1]

    await wait_until(counted)


async def test_a_turn_that_outlived_its_lease_is_dropped_and_run_again_by_the_next_owner(
    make_instance: Callable[..., Instance], raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    instance = make_instance(partitions=1, consumer="slow")
    entered, go_on = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    @instance.on("count.inc")
    async def count(ctx: EventContext) -> None:
        runs.append(ctx.subject.name)
        if len(runs) == 1:
            entered.set()
            await go_on.wait()  # paused past its lease
        await ctx.subject.set("count", lambda n: (n or 0) + 1)

    await instance.start()
    await instance.emit("count.inc", "late")
    await asyncio.wait_for(entered.wait(), 5)
    keys = instance.storage.keys
    await raw.set(keys.lease(0), f"{int(time.time() * 1000) + 10_000}:other:0000", px=300)  # taken meanwhile
    await wait_until(lambda: _equals(instance.streams.partitions, ()))
    go_on.set()

    await wait_until(lambda: _true("was not committed here" in caplog.text))
    # The other instance's lease runs out; this one takes the partition again, with the entry.
    await wait_until(lambda: _equals(_count(instance.storage, "late"), 1))
    assert runs == ["late", "late"]
    assert await raw.xpending(keys.stream(0), "krules") == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_static_ids_are_checked_against_the_recorded_count_when_none_is_given(
    redis_server: LocalRedisServer, redis_key_prefix: str, raw: aioredis.Redis
) -> None:
    await raw.set(f"{redis_key_prefix}partitions", 8)
    assert Settings.from_env({"KRULES_PARTITION_ID": "5"}).partition_id == "5"  # the count is not known yet

    instance = Instance(redis_server.url, redis_key_prefix, partitions=None, partition_id="5", **FAST)
    try:
        assert instance.settings.partitions is None
        assert instance.leases.wanted == (5,) and instance.storage.keys.partitions == 8
    finally:
        await instance.stop()
    with pytest.raises(ConfigurationError, match="names partition 9, but there are only 8"):
        Instance(redis_server.url, redis_key_prefix, partitions=None, partition_id="9", **FAST)


async def test_an_auto_instance_with_no_partition_left_is_listed_as_live_and_owning_none(
    make_instance: Callable[..., Instance],
) -> None:
    owner = make_instance(partitions=1, consumer="owner")
    await owner.start()
    await wait_until(lambda: _equals(owner.streams.partitions, (0,)))
    spare = make_instance(partitions=1, consumer="spare")
    await spare.start()

    async def both_live() -> bool:
        return [i["name"] for i in await live_instances(owner.storage)] == ["owner", "spare"]

    await wait_until(both_live)
    status = await owner.streams.status()
    assert status[0]["owner"]["instance"] == "owner" and spare.streams.partitions == ()
