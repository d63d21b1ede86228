"""Timers in the Redis backend: kept in the partition's slot, written by the turn's commit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from krules.events import Event
from krules.testing.redis_server import LocalRedisServer
from krules.timers import CANCEL, TIMER_EXTENSION, Fired, Timer
from storage.base import SubjectChanges
from storage.redis import RedisStorage, create_redis_storage

pytestmark = pytest.mark.redis_server


@dataclass
class Receipt:
    event_id: str
    partition: int = 0
    entry_id: str = ""
    fence: str = ""


@pytest.fixture
async def storage(redis_server: LocalRedisServer, redis_key_prefix: str) -> AsyncIterator[RedisStorage]:
    backend = create_redis_storage(redis_server.url, key_prefix=redis_key_prefix, partitions=4)
    await backend.check()
    await backend.layout()
    yield backend
    await backend.close()


def timer(subject: str, key: str, due: float, event_id: str = "t-1") -> Timer:
    return Timer(Event("ding", subject, {"n": 1}, event_id, "test", due, 0, None, {TIMER_EXTENSION: key}))


def in_partition(storage: RedisStorage, partition: int) -> str:
    return next(n for n in (f"s-{i}" for i in range(100)) if storage.keys.partition(n) == partition)


async def test_a_committed_timer_is_a_due_time_and_a_record_in_its_partitions_slot(
    storage: RedisStorage, raw: aioredis.Redis, redis_key_prefix: str
) -> None:
    name = in_partition(storage, 0)
    await raw.config_resetstat()

    assert await storage.commit(
        [SubjectChanges(name, {"a": "1"}, timers={"k": timer(name, "k", 1000.5)})], Receipt("e-1")
    )

    member = f"{len(name)}:{name}k"
    assert await raw.zrange(f"{redis_key_prefix}{{p0}}:timers", 0, -1, withscores=True) == [(member, 1000500)]
    record = await raw.hget(f"{redis_key_prefix}{{p0}}:timer-records", member)
    assert record is not None and '"krulestimer":"k"' in record
    stats = await raw.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1  # it rode in the commit
    [listed] = await storage.timers(name)
    assert (listed.key, listed.due, listed.event.data) == ("k", 1000.5, {"n": 1})


async def test_a_commit_made_before_schedules_nothing_again(storage: RedisStorage) -> None:
    name = in_partition(storage, 1)
    changes = [SubjectChanges(name, {"a": "1"}, timers={"k": timer(name, "k", 1000)})]
    assert await storage.commit(changes, Receipt("e-1", partition=1))
    assert await storage.cancel_timer(name, "k")

    again = [SubjectChanges(name, {"a": "1"}, timers={"k": timer(name, "k", 1000)})]
    assert not await storage.commit(again, Receipt("e-1", partition=1))
    assert await storage.timers(name) == []


async def test_a_store_cancels_and_replaces_timers_by_key(storage: RedisStorage) -> None:
    name = in_partition(storage, 2)
    await storage.store([SubjectChanges(name, timers={"a": timer(name, "a", 5), "b": timer(name, "b", 6)})])
    await storage.store([SubjectChanges(name, timers={"a": CANCEL, "b": timer(name, "b", 9, "t-2")})])

    assert [(t.key, t.due, t.event.id) for t in await storage.timers(name)] == [("b", 9, "t-2")]
    assert [t.subject for t in await storage.all_timers(due_before=10)] == [name]
    assert await storage.all_timers(due_before=9) == []
    assert not await storage.cancel_timer(name, "a")


async def test_a_firings_commit_forgets_its_own_marker_and_never_a_newer_firings(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    name = in_partition(storage, 3)
    markers = storage.keys.timers_fired(3)
    member = f"{len(name)}:{name}k"
    await raw.hset(markers, member, "2-0")  # a newer firing, moved after the one committing now

    done = [SubjectChanges(name, timers={"k": Fired("t-1")})]
    assert await storage.commit(done, Receipt("t-1", partition=3, entry_id="1-0"))
    assert await storage.fired_timer(name, "k") == "2-0"

    assert await storage.commit(
        [SubjectChanges(name, timers={"k": Fired("t-2")})], Receipt("t-2", partition=3, entry_id="2-0")
    )
    assert await storage.fired_timer(name, "k") is None


async def test_a_schedule_or_a_cancel_of_a_key_makes_its_firing_on_the_way_stale(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    name = in_partition(storage, 1)
    markers = storage.keys.timers_fired(1)
    member = f"{len(name)}:{name}k"

    await raw.hset(markers, member, "1-0")
    await storage.store([SubjectChanges(name, timers={"k": timer(name, "k", 5)})])
    assert await storage.fired_timer(name, "k") is None

    await raw.hset(markers, member, "2-0")
    await storage.store([SubjectChanges(name, timers={"k": CANCEL})])
    assert await storage.fired_timer(name, "k") is None

    await raw.hset(markers, member, "3-0")  # fired and not yet run: the CLI's cancel reaches it
    assert await storage.cancel_timer(name, "k")
    assert await storage.fired_timer(name, "k") is None
    assert not await storage.cancel_timer(name, "k")
