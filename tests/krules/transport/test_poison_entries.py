"""Poison on the partition streams of a real redis-server: whatever an entry holds, and whatever its turn
runs into, the partition goes on.  The entry becomes a dead letter committed with its ack, nothing of it
stays pending, and the events after it are processed exactly once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from krules.context import EventContext
from krules.dead_letters import DeadLetter, DeadLetters
from krules.events import Event
from krules.http.server import serve_in_background
from krules.testing import RedisModeApp, wait_until
from krules.testing.redis_server import LocalRedisServer
from storage.redis.keys import CONSUMER_GROUP

pytestmark = pytest.mark.redis_server


class Instance(RedisModeApp):
    """A Redis-mode app (one partition) that counts ``count.inc`` events and notes each handled id."""

    def __init__(self, url: str, key_prefix: str, **settings: Any) -> None:
        super().__init__(url, key_prefix, **{"partitions": 1, **settings})
        self.handled: list[str] = []

        @self.on("count.inc")
        async def count(ctx: EventContext) -> None:
            self.handled.append(ctx.event_id)
            await ctx.subject.set("count", lambda n: (n or 0) + 1)

    async def count_of(self, name: str) -> int | None:
        try:
            value: int = await self.storage.get(name, "count")
        except KeyError:
            return None
        return value


@pytest.fixture
async def make_instance(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> AsyncIterator[Callable[..., Instance]]:
    made: list[Instance] = []

    def make(**settings: Any) -> Instance:
        instance = Instance(redis_server.url, redis_key_prefix, **settings)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        await instance.stop()


@pytest.fixture
async def raw(redis_server: LocalRedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)  # bytes in, bytes out: nothing decoded
    yield client
    await client.aclose()


def envelope(subject: str = "poisoned", **fields: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "poison-1",
        "source": "another-service",
        "type": "count.inc",
        "subject": subject,
        **fields,
    }


async def dead_letters(instance: Instance) -> list[DeadLetter]:
    return await DeadLetters(instance.storage).list()


async def pending(raw: aioredis.Redis, instance: Instance) -> int:
    summary = await raw.xpending(instance.storage.keys.stream(0), CONSUMER_GROUP)
    return int(summary["pending"])


async def poison_then_good(
    instance: Instance, raw: aioredis.Redis, *entries: dict[str, Any], good: int = 3, poisoned: int = 0
) -> list[DeadLetter]:
    """Start the instance, XADD the poison entries, then ``good`` events; wait until the good ones are
    counted and the poison (and ``poisoned`` entries already in the stream) dead-lettered; return the
    dead letters.  The instance is stopped at the end: its worker task raising there would mean it
    had crashed."""
    await instance.start()
    for fields in entries:
        await raw.xadd(instance.storage.keys.stream(0), fields)
    for i in range(good):
        await instance.emit("count.inc", f"good-{i}")

    async def settled() -> bool:
        counted = [await instance.count_of(f"good-{i}") for i in range(good)]
        return counted == [1] * good and len(await dead_letters(instance)) == len(entries) + poisoned

    await wait_until(settled)
    await wait_until(lambda: _is(pending(raw, instance), 0))
    parked = await dead_letters(instance)
    await instance.stop()  # the worker ran throughout, or this raises its error
    assert len(instance.handled) == len(set(instance.handled)) == good  # each good event once
    return sorted(parked, key=lambda record: _stream_order(record.entry_id))


def _stream_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


# -- entries that are not events ---------------------------------------------------------------------
async def test_an_entry_nested_100000_deep_is_a_dead_letter_and_the_partition_goes_on(
    make_instance: Callable[..., Instance], raw: aioredis.Redis
) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    deep_data = json.dumps(envelope(id="deep-data")).replace('"poisoned"', '"poisoned", "data": ' + deep)

    parked = await poison_then_good(make_instance(), raw, {"event": deep}, {"event": deep_data})

    assert [record.reason for record in parked] == ["invalid_event", "invalid_event"]
    assert all("nests arrays and objects" in record.error["message"] for record in parked)
    assert parked[0].event == {"event": deep}  # the entry's fields, as received
    assert parked[1].event == {"event": deep_data}


async def test_an_instance_restarted_on_a_deep_entry_left_pending_dead_letters_it(
    make_instance: Callable[..., Instance], raw: aioredis.Redis
) -> None:
    first = make_instance(consumer="restarting")
    await first.start()
    await first.stop()
    # Taken by the instance, which then died: once restarted, it reads the entry from its pending list.
    stream = first.storage.keys.stream(0)
    await raw.xadd(stream, {"event": "[" * 100_000 + "]" * 100_000})
    await raw.xreadgroup(CONSUMER_GROUP, "restarting", {stream: ">"}, count=1)

    parked = await poison_then_good(make_instance(consumer="restarting"), raw, good=2, poisoned=1)

    assert [(record.reason, record.attempts) for record in parked] == [("invalid_event", 2)]


async def test_an_entry_whose_subject_holds_a_lone_surrogate_is_dead_lettered_on_its_first_delivery(
    make_instance: Callable[..., Instance], raw: aioredis.Redis
) -> None:
    text = json.dumps(envelope("a\ud800"))  # ASCII, with the escape "a\ud800"
    assert "\\ud800" in text

    (record,) = await poison_then_good(make_instance(max_deliveries=5), raw, {"event": text})

    assert (record.reason, record.attempts) == ("invalid_event", 1)
    assert "lone surrogate" in record.error["message"] and "$['subject']" in record.error["message"]
    assert record.event == {"event": text}
    assert (record.event_id, record.subject) == ("poison-1", "a\\ud800")  # shown escaped, storable


async def test_entries_whose_subject_is_not_utf8_are_dead_lettered_never_replaced(
    make_instance: Callable[..., Instance], raw: aioredis.Redis
) -> None:
    def entry(subject: bytes, event_id: str) -> dict[str, bytes]:
        text = json.dumps(envelope("SUBJECT", id=event_id)).encode()
        return {"event": text.replace(b"SUBJECT", subject)}

    instance = make_instance()
    parked = await poison_then_good(
        instance,
        raw,
        entry(b"\xff\xfe", "ff-fe"),
        entry(b"\xfe\xff", "fe-ff"),
        entry(b"\xed\xa0\x80", "utf8-surrogate"),  # a surrogate encoded as UTF-8 is not UTF-8 either
    )

    assert [record.reason for record in parked] == ["invalid_event"] * 3
    assert all("is not UTF-8" in record.error["message"] for record in parked)
    assert '"subject": "\\xff\\xfe"' in parked[0].event["event"]  # the bytes, shown as escapes
    assert '"subject": "\\xfe\\xff"' in parked[1].event["event"]
    assert not await raw.exists(instance.storage.keys.subject("\ufffd\ufffd"))  # never one subject for both


async def test_an_entry_far_over_the_event_size_limit_is_a_dead_letter_keeping_its_start(
    make_instance: Callable[..., Instance], raw: aioredis.Redis
) -> None:
    big = json.dumps(envelope(data={"blob": "x" * (3 << 20)}))

    (record,) = await poison_then_good(make_instance(), raw, {"event": big, "note": "kept"}, good=1)

    assert record.reason == "invalid_event"
    assert "more than the 1048576" in record.error["message"]
    assert record.event["event"].startswith(big[:1000]) and len(record.event["event"]) <= (1 << 20) + 3
    assert record.event_id == ""  # not read: too large to look into


# -- turns that fail unexpectedly --------------------------------------------------------------------
def failing_on(instance: Instance, subject: str, error: Exception) -> list[str]:
    """Make the engine raise ``error`` (not a storage error) for every event of ``subject``."""
    process = instance.engine.process
    tries: list[str] = []

    async def process_or_fail(event: Event, *args: Any, **kwargs: Any) -> Any:
        if event.subject == subject:
            tries.append(event.id)
            raise error
        return await process(event, *args, **kwargs)

    instance.engine.process = process_or_fail  # type: ignore[method-assign]
    return tries


async def test_an_entry_whose_turn_fails_unexpectedly_is_dead_lettered_after_max_deliveries(
    make_instance: Callable[..., Instance], raw: aioredis.Redis
) -> None:
    instance = make_instance(max_deliveries=3)
    tries = failing_on(instance, "boom", RuntimeError("kaboom"))
    text = json.dumps(envelope("boom", id="boom-1"))

    (record,) = await poison_then_good(instance, raw, {"event": text})

    assert tries == ["boom-1"] * 3
    assert (record.reason, record.attempts, record.event_id) == ("max_deliveries", 3, "boom-1")
    assert record.error["type"] == "RuntimeError"
    assert "failed 3 times" in record.error["message"] and "kaboom" in record.error["message"]
    assert "RuntimeError: kaboom" in record.traceback
    assert record.event["subject"] == "boom"  # the event itself


async def test_an_entry_whose_event_cannot_be_dead_lettered_is_parked_with_its_fields(
    make_instance: Callable[..., Instance], raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from krules.transport import worker as worker_module

    instance = make_instance(max_deliveries=2)
    failing_on(instance, "boom", ValueError("cannot"))
    made = worker_module.entry_dead_letter

    def unstorable_event(delivery: Any, *args: Any) -> DeadLetter:
        if delivery.event is not None:
            raise TypeError("this event cannot be stored")
        return made(delivery, *args)

    monkeypatch.setattr(worker_module, "entry_dead_letter", unstorable_event)
    text = json.dumps(envelope("boom", id="boom-2"))

    (record,) = await poison_then_good(instance, raw, {"event": text})

    assert (record.reason, record.attempts, record.error["type"]) == ("max_deliveries", 2, "ValueError")
    assert record.event == {"event": text}  # the entry's fields instead of the event


async def test_an_entry_redelivered_past_the_limit_after_unexpected_failures_is_dead_lettered(
    make_instance: Callable[..., Instance], raw: aioredis.Redis
) -> None:
    instance = make_instance(max_deliveries=2)
    await instance.start()
    await instance.stop()
    stream = instance.storage.keys.stream(0)
    await raw.xadd(stream, {"event": json.dumps(envelope("boom", id="boom-3"))})
    # Three deliveries to consumers that died: each took the entry from the one before.
    await raw.xreadgroup(CONSUMER_GROUP, "crashed-a", {stream: ">"}, count=1)
    await raw.xautoclaim(stream, CONSUMER_GROUP, "crashed-b", 0, "0-0")
    await raw.xautoclaim(stream, CONSUMER_GROUP, "crashed-c", 0, "0-0")
    restarted = make_instance(max_deliveries=2, claim_idle_ms=100)
    tries = failing_on(restarted, "boom", RuntimeError("never reached"))

    (record,) = await poison_then_good(restarted, raw, good=1, poisoned=1)

    assert tries == []  # parked before its turn: delivered more often than allowed
    assert (record.reason, record.event_id) == ("max_deliveries", "boom-3")


# -- the ingress in Redis mode -----------------------------------------------------------------------
async def test_the_ingress_in_redis_mode_answers_400_to_a_lone_surrogate_and_queues_nothing(
    make_instance: Callable[..., Instance], raw: aioredis.Redis
) -> None:
    instance = make_instance()
    await instance.start()
    body = json.dumps(envelope("a\ud800"))
    async with serve_in_background(instance.engine) as server, httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            server.url + "/events", content=body, headers={"content-type": "application/cloudevents+json"}
        )
        deep = await http.post(
            server.url + "/events",
            content="[" * 100_000 + "]" * 100_000,
            headers={"content-type": "application/cloudevents-batch+json"},
        )
        await instance.stop()

    assert response.status_code == 400
    assert "lone surrogate" in response.json()["error"]
    assert deep.status_code == 400
    assert "nests arrays and objects" in deep.json()["error"]
    assert await raw.xlen(instance.storage.keys.stream(0)) == 0
