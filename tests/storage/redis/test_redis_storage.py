"""What only the Redis backend promises: its key layout, its command budget, idempotent retries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from krules.errors import ConfigurationError, LeaseLostError, UpdateConflictError
from krules.partitioning import partition_of
from krules.testing.redis_server import LocalRedisServer
from storage.base import DELETE, SubjectChanges, Update
from storage.redis import RedisStorage, create_redis_storage


def increment(n: Any) -> int:
    return (n or 0) + 1


@pytest.fixture
async def storage(redis_server: LocalRedisServer, redis_key_prefix: str) -> AsyncIterator[RedisStorage]:
    backend = create_redis_storage(redis_server.url, key_prefix=redis_key_prefix, partitions=4)
    await backend.check()
    await backend.layout()  # records the count once: what the costs below leave out
    yield backend
    await backend.close()


async def command_calls(raw: aioredis.Redis) -> dict[str, int]:
    """Commands the server ran since the last ``CONFIG RESETSTAT``, including those scripts ran."""
    stats = await raw.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}
    return {name: n for name, n in calls.items() if name not in {"config|resetstat", "info"}}


# -- layout ------------------------------------------------------------------------------------


@pytest.mark.redis_server
async def test_a_subject_is_one_hash_under_its_partition_tag_with_json_fields(
    storage: RedisStorage, raw: aioredis.Redis, redis_key_prefix: str
) -> None:
    await storage.store([SubjectChanges("order-7", {"status": '"new"', "total": "30.5"}, {"seen": "true"})])

    key = f"{redis_key_prefix}{{p{partition_of('order-7', 4)}}}:s:order-7"
    assert await raw.hgetall(key) == {"p:status": '"new"', "p:total": "30.5", "x:seen": "true"}


@pytest.mark.redis_server
async def test_json_written_by_another_service_in_the_documented_layout_is_read(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    await raw.hset(storage.keys.subject("sensor-1"), mapping={"p:celsius": "21.5", "x:unit": '"C"'})

    assert await storage.load("sensor-1") == ({"celsius": 21.5}, {"unit": "C"})
    assert await storage.subjects("sensor") == ["sensor-1"]


@pytest.mark.redis_server
async def test_a_subject_updated_then_emptied_leaves_no_key_behind(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    await storage.update("counter", "n", increment)  # also records a write token in the hash
    await storage.update("batch", "n", increment)

    await storage.delete("counter", "n")
    await storage.store([SubjectChanges("batch", {"n": DELETE})])

    assert await raw.exists(storage.keys.subject("counter"), storage.keys.subject("batch")) == 0


# -- command budget ----------------------------------------------------------------------------


@pytest.mark.redis_server
async def test_a_turn_costs_one_hgetall_and_one_evalsha(storage: RedisStorage, raw: aioredis.Redis) -> None:
    await storage.store([SubjectChanges("order-1", {"status": '"new"', "seen": "1"})])
    await raw.config_resetstat()

    props, _ = await storage.load("order-1")
    await storage.store(
        [
            SubjectChanges(
                "order-1", {"status": '"validated"', "seen": Update(str(props["seen"]), increment, "2")}
            )
        ]
    )

    assert await command_calls(raw) == {"hgetall": 1, "evalsha": 1, "hmget": 1, "hset": 1}
    assert await storage.load("order-1") == ({"status": "validated", "seen": 2}, {})


@pytest.mark.redis_server
async def test_a_turn_of_plain_writes_costs_one_evalsha_with_one_hset(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    await raw.config_resetstat()

    await storage.store([SubjectChanges("order-2", {"status": '"new"', "total": "10", "lines": "[1,2]"})])

    assert await command_calls(raw) == {"evalsha": 1, "hset": 1}


@pytest.mark.redis_server
async def test_a_batch_costs_one_evalsha_per_partition_touched(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    names = [f"item-{i}" for i in range(20)]
    partitions = {partition_of(name, 4) for name in names}
    await raw.config_resetstat()

    await storage.store([SubjectChanges(name, {"n": "1"}) for name in names])

    assert await command_calls(raw) == {"evalsha": len(partitions), "hset": len(names)}


@pytest.mark.redis_server
async def test_update_costs_one_hget_and_one_evalsha(storage: RedisStorage, raw: aioredis.Redis) -> None:
    await raw.config_resetstat()

    assert await storage.update("c", "n", increment) == (1, None, False)

    assert await command_calls(raw) == {"hget": 1, "evalsha": 1, "hmget": 1, "hset": 1}


@pytest.mark.redis_server
async def test_a_repeated_update_bets_on_its_last_value_and_costs_one_evalsha(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    await storage.update("c", "n", increment)
    await raw.config_resetstat()

    assert await storage.update("c", "n", increment) == (2, 1, True)

    assert await command_calls(raw) == {"evalsha": 1, "hmget": 1, "hset": 1}


@pytest.mark.redis_server
async def test_plain_writes_of_the_same_storage_keep_the_next_update_to_one_evalsha(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    await storage.update("c", "n", increment)
    await storage.set("c", "n", "10")
    await raw.config_resetstat()
    assert await storage.update("c", "n", increment) == (11, 10, True)
    await storage.delete("c", "n")
    assert await storage.update("c", "n", increment) == (1, None, False)

    calls = await command_calls(raw)
    assert (calls["evalsha"], calls.get("hget", 0)) == (3, 1)  # the delete script runs one HGET


@pytest.mark.redis_server
async def test_an_update_whose_bet_another_writer_spoilt_builds_on_the_stored_value(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    await storage.update("c", "n", increment)
    await raw.hset(storage.keys.subject("c"), "p:n", "10")
    await raw.config_resetstat()

    assert await storage.update("c", "n", increment) == (11, 10, True)

    # The lost bet's reply carried the stored value: no HGET, one more script call.
    assert await command_calls(raw) == {"evalsha": 2, "hmget": 2, "hset": 1}


@pytest.mark.redis_server
async def test_a_callable_that_fails_on_a_spoilt_bet_runs_again_on_the_stored_value(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    await storage.update("c", "n", increment)
    await raw.hset(storage.keys.subject("c"), "p:n", "5")

    assert await storage.update("c", "n", lambda n: 12 // (n - 1)) == (3, 5, True)
    await raw.hset(storage.keys.subject("c"), "p:n", "1")
    with pytest.raises(ZeroDivisionError):
        await storage.update("c", "n", lambda n: 12 // (n - 1))
    assert await storage.get("c", "n") == 1


# -- commits of turns ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    """What a turn's commit records: no stream entry nor lease here, only the event processed."""

    event_id: str
    partition: int = 0
    entry_id: str = ""
    fence: str = ""


def names_in(partition: int, n: int) -> list[str]:
    return [name for name in (f"order-{i}" for i in range(200)) if partition_of(name, 4) == partition][:n]


@pytest.mark.redis_server
async def test_the_commits_of_one_partition_made_together_cost_one_evalsha(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    names = names_in(0, 10)
    await raw.config_resetstat()

    committed = await asyncio.gather(
        *(
            storage.commit([SubjectChanges(name, {"status": '"paid"'})], Receipt(f"e-{name}"))
            for name in names
        )
    )

    assert committed == [True] * 10
    assert await command_calls(raw) == {"evalsha": 1, "time": 1, "zscore": 10, "hset": 10, "zadd": 10}
    assert [await storage.get(name, "status") for name in names] == ["paid"] * 10


@pytest.mark.redis_server
async def test_a_commit_whose_compare_and_set_fails_goes_again_alone_and_the_others_are_stored(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    plain, counted = names_in(0, 2)
    await storage.store([SubjectChanges(counted, {"n": "1"})])
    await raw.hset(storage.keys.subject(counted), "p:n", "5")  # another writer, after the turn read 1

    committed = await asyncio.gather(
        storage.commit([SubjectChanges(plain, {"n": "1"})], Receipt("e-plain")),
        storage.commit([SubjectChanges(counted, {"n": Update("1", increment, "2")})], Receipt("e-counted")),
    )

    assert committed == [True, True]
    assert (await storage.get(plain, "n"), await storage.get(counted, "n")) == (1, 6)


@pytest.mark.redis_server
async def test_an_event_committed_before_is_only_acknowledged_and_the_others_of_its_run_are_stored(
    storage: RedisStorage,
) -> None:
    first, second = names_in(0, 2)
    await storage.commit([SubjectChanges(first, {"n": "1"})], Receipt("e-1"))

    committed = await asyncio.gather(
        storage.commit([SubjectChanges(first, {"n": "2"})], Receipt("e-1")),
        storage.commit([SubjectChanges(second, {"n": "2"})], Receipt("e-2")),
    )

    assert committed == [False, True]
    assert (await storage.get(first, "n"), await storage.get(second, "n")) == (1, 2)


@pytest.mark.redis_server
async def test_commits_under_a_lease_that_is_gone_are_all_refused_and_write_nothing(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    names = names_in(0, 3)
    await raw.set(storage.keys.lease(0), "7:another-instance:n2")

    results = await asyncio.gather(
        *(
            storage.commit([SubjectChanges(name, {"n": "1"})], Receipt(f"e-{name}", fence="6:this:n1"))
            for name in names
        ),
        return_exceptions=True,
    )

    assert [type(result) for result in results] == [LeaseLostError] * 3
    assert await raw.exists(*(storage.keys.subject(name) for name in names)) == 0


@pytest.mark.redis_server
async def test_a_run_the_server_refuses_is_tried_again_commit_by_commit(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    names = names_in(1, 5)
    await raw.script_flush()  # the run gets NOSCRIPT; each commit then reloads and goes alone

    committed = await asyncio.gather(
        *(
            storage.commit([SubjectChanges(name, {"n": "1"})], Receipt(f"e-{name}", partition=1))
            for name in names
        )
    )

    assert committed == [True] * 5
    assert [await storage.get(name, "n") for name in names] == [1] * 5


# -- scripts and retries -----------------------------------------------------------------------


@pytest.mark.redis_server
async def test_scripts_flushed_from_the_server_are_loaded_again_transparently(
    storage: RedisStorage, raw: aioredis.Redis
) -> None:
    await raw.script_flush()
    assert await storage.update("c", "n", increment) == (1, None, False)

    await raw.script_flush()
    await storage.store([SubjectChanges(name, {"n": "5"}) for name in ("a", "b", "c", "d", "e")])
    await raw.script_flush()
    assert await storage.set("a", "m", "1") == (False, None)
    await raw.script_flush()
    assert await storage.delete("a", "m") == (True, 1)

    assert await storage.load("c") == ({"n": 5}, {})


class LosesEvalReplies(fakeredis.FakeAsyncRedis):
    """Runs EVALSHA, then loses the reply ``lose`` times: a connection cut at the worst moment."""

    lose = 0

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        reply = await super().evalsha(sha, numkeys, *keys_and_args)
        if self.lose:
            self.lose -= 1
            raise RedisConnectionError("Connection reset by peer")
        return reply


async def test_an_update_whose_reply_was_lost_is_retried_without_applying_it_twice() -> None:
    client = LosesEvalReplies()
    storage = create_redis_storage(client=client, retry_backoff=0.001)
    await storage.update("c", "n", increment)

    client.lose = 2
    assert await storage.update("c", "n", increment) == (2, 1, True)
    client.lose = 1
    await storage.store([SubjectChanges("c", {"n": Update("1", increment, "2")})])  # stale: re-applied

    assert await storage.get("c", "n") == 3
    await client.aclose()


class AlwaysOvertaken(fakeredis.FakeAsyncRedis):
    """Lets another writer bump ``p:n`` of every subject right before each script runs."""

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        for key in keys_and_args[:numkeys]:
            await self.hincrby(key, "p:n", 1)
        return await super().evalsha(sha, numkeys, *keys_and_args)


async def test_a_callable_update_that_keeps_losing_gives_up_with_a_clear_sentence() -> None:
    client = AlwaysOvertaken()
    storage = create_redis_storage(client=client, update_attempts=3)
    await storage.check()  # scripts loaded: every script call below is one lost race

    with pytest.raises(UpdateConflictError, match=r"^Updating property 'n' of subject 'hot' lost .* 3 times"):
        await storage.update("hot", "n", increment)
    with pytest.raises(UpdateConflictError, match=r"^Callable updates of subjects \['hot'\] lost .* 3 times"):
        await storage.store([SubjectChanges("hot", {"n": Update(None, increment, "1"), "other": "1"})])

    assert await storage.load("hot") == ({"n": 6}, {})  # only the other writer's bumps, nothing of ours
    await client.aclose()


class RacedBeforeEveryScript(fakeredis.FakeAsyncRedis):
    """Lets a rival writer try one callable update of ``hot.n`` right before each of our scripts."""

    rival: RedisStorage

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        with contextlib.suppress(UpdateConflictError):  # the rival gives up when our claim blocks it
            await self.rival.update("hot", "n", increment)
        return await super().evalsha(sha, numkeys, *keys_and_args)


async def test_a_writer_that_keeps_losing_claims_the_subject_and_then_wins() -> None:
    server = fakeredis.FakeServer()
    rival_client = fakeredis.FakeAsyncRedis(server=server)
    client = RacedBeforeEveryScript(server=server)
    client.rival = create_redis_storage(client=rival_client, update_attempts=1)
    storage = create_redis_storage(client=client, update_attempts=6)
    await storage.check()

    # The rival wins 4 races; our 4th loss claims the subject, so the rival's 5th try must wait.
    assert await storage.update("hot", "n", increment) == (5, 4, True)

    assert await storage.load("hot") == ({"n": 5}, {})
    assert await client.hkeys(storage.keys.subject("hot")) == [b"p:n", b"m:w"]  # the claim is gone
    await client.aclose()
    await rival_client.aclose()


@pytest.mark.parametrize("expires_in_ms", [-1000, 30])
async def test_a_claim_left_by_a_vanished_writer_blocks_only_until_it_expires(expires_in_ms: int) -> None:
    client = fakeredis.FakeAsyncRedis()
    storage = create_redis_storage(client=client)
    key = storage.keys.subject("hot")
    seconds, micros = await client.time()
    await client.hset(key, "m:c", f"{'0' * 16}:{seconds * 1000 + micros // 1000 + expires_in_ms}")

    assert await storage.update("hot", "n", increment) == (1, None, False)
    await storage.store([SubjectChanges("hot", {"n": Update("1", increment, "2")})])
    await storage.delete("hot", "n")

    assert await client.exists(key) == 0  # no claim nor token keeps an empty subject alive
    await client.aclose()


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"key_prefix": "app{1}:"}, "contains a brace"),
        ({"partitions": 0}, "partition count must be a positive integer"),
        ({"retries": -1}, "retries must be an integer of at least 0"),
        ({"update_attempts": 0}, "update_attempts must be an integer of at least 1"),
        ({"retry_backoff": 0}, "retry_backoff must be a positive number of seconds"),
    ],
)
def test_bad_settings_are_refused_when_the_storage_is_created(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        create_redis_storage("redis://127.0.0.1:6379/0", **options)


async def test_the_storage_names_its_server_without_the_password() -> None:
    storage = create_redis_storage("redis://alice:s3cret@127.0.0.1:6390/2?password=s3cret")

    assert storage.url == "redis://alice@127.0.0.1:6390/2"
    assert "s3cret" not in repr(storage)
    await storage.close()


async def test_the_krules_call_with_a_client_first_and_redis_prefix_still_works() -> None:
    client = fakeredis.FakeAsyncRedis()
    storage = create_redis_storage(client, redis_prefix="ported:")
    await storage.set("user-1", "name", '"Ada"')
    assert await storage.get("user-1", "name") == "Ada"
    assert await client.keys("ported:*")
    await storage.close()
    await client.aclose()
