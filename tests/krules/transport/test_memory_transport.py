"""The partition worker over the in-memory transport: the engine's ports exercised without Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from dependency_injector import providers

from krules.config import Settings
from krules.container import KRulesContainer
from krules.context import EventContext
from krules.dead_letters import DeadLetters
from krules.engine import Engine
from krules.errors import OverloadedError
from krules.events import Event
from krules.partitioning import partition_of
from krules.testing import wait_until
from krules.transport.base import ENTRY_FIELD, encode_entry
from krules.transport.memory import MemoryStreams
from krules.transport.worker import PartitionWorker
from storage.memory import MemoryStorage

PARTITIONS = 2


@dataclass
class Deployment:
    engine: Engine
    streams: MemoryStreams
    storage: MemoryStorage
    worker: PartitionWorker
    container: KRulesContainer

    async def drained(self) -> bool:
        return not any(self.streams.entries.values()) and not self.worker._inflight


@pytest.fixture
async def deployment() -> AsyncIterator[Deployment]:
    settings = Settings(partitions=PARTITIONS, stream_block_ms=20, claim_idle_ms=200)
    storage = MemoryStorage()
    container = KRulesContainer()
    container.settings.override(providers.Object(settings))
    container.subject_storage.override(providers.Object(storage))
    on, _when, _middleware, _emit = container.handlers()

    @on("count.inc")
    async def count(ctx: EventContext) -> None:
        await ctx.subject.set("n", lambda n: (n or 0) + 1)

    engine: Engine = container.engine()
    streams = MemoryStreams(storage, PARTITIONS)
    engine.transport = streams
    worker = PartitionWorker(engine, streams)
    await engine.start()
    task = asyncio.ensure_future(worker.run())
    try:
        yield Deployment(engine, streams, storage, worker, container)
    finally:
        worker.stop()
        await task
        await engine.close()


async def test_events_sent_to_the_memory_streams_are_each_committed_once(deployment: Deployment) -> None:
    events = [deployment.engine.new_event("count.inc", f"c-{i % 3}", {}) for i in range(30)]
    await deployment.streams.send(events)
    await wait_until(deployment.drained)
    for i in range(3):
        props, _ = await deployment.storage.load(f"c-{i}")
        assert props["n"] == 10
    assert deployment.streams.committed == {event.id for event in events}


async def test_an_event_committed_before_is_acknowledged_without_writing_again(
    deployment: Deployment,
) -> None:
    event = deployment.engine.new_event("count.inc", "once", {})
    await deployment.streams.send([event])
    await wait_until(deployment.drained)
    await deployment.streams.send([event])  # a client retrying the same send
    await wait_until(deployment.drained)
    props, _ = await deployment.storage.load("once")
    assert props["n"] == 1


async def test_an_entry_that_is_not_an_event_becomes_a_dead_letter_and_is_acknowledged(
    deployment: Deployment,
) -> None:
    deployment.streams.append(0, {ENTRY_FIELD: "{not json"})
    await wait_until(deployment.drained)
    [letter] = await DeadLetters(deployment.storage).list()
    assert letter.reason == "invalid_event"
    assert letter.handler == ""


async def test_an_entry_in_the_wrong_partition_is_forwarded_to_its_subjects_and_processed_there(
    deployment: Deployment,
) -> None:
    subject = next(f"s-{i}" for i in range(100) if partition_of(f"s-{i}", PARTITIONS) == 1)
    event = deployment.engine.new_event("count.inc", subject, {})
    deployment.streams.append(0, encode_entry(event))
    await wait_until(deployment.drained)
    props, _ = await deployment.storage.load(subject)
    assert props["n"] == 1
    assert await DeadLetters(deployment.storage).list() == []


async def test_the_memory_transport_refuses_events_for_a_partition_at_its_backlog_bound() -> None:
    streams = MemoryStreams(MemoryStorage(), PARTITIONS, max_backlog=3)
    engine = Engine(KRulesContainer().registry(), streams.storage)
    full = [e for e in (engine.new_event("t", f"s{i}") for i in range(50)) if partition_of(e.subject, 2) == 0]
    other = next(e for e in (engine.new_event("t", f"o{i}") for i in range(50)) if partition_of(e.subject, 2))
    await streams.admit(full[:5])  # nothing waits yet: let in, whatever its size
    await streams.send(full[:5])

    with pytest.raises(OverloadedError, match="Partition 0 holds 5 unprocessed events") as refused:
        await streams.admit([other, full[5]])
    await streams.admit([other])

    assert refused.value.reason == "stream_backlog"


async def test_hostile_entries_become_dead_letters_with_their_fields_and_the_partition_goes_on(
    deployment: Deployment,
) -> None:
    head = '{"specversion": "1.0", "id": "x", "source": "t", "type": "count.inc", "subject": '
    hostile: list[dict[str, str | bytes]] = [
        {ENTRY_FIELD: "[" * 100_000 + "]" * 100_000},
        {ENTRY_FIELD: head + '"\\ud800"}'},
        {ENTRY_FIELD: head.encode() + b'"\xff"}'},
    ]
    for fields in hostile:
        deployment.streams.append(0, fields)
    await deployment.streams.send([deployment.engine.new_event("count.inc", "after", {})])
    await wait_until(deployment.drained)
    letters = sorted(await DeadLetters(deployment.storage).list(), key=lambda letter: letter.entry_id)
    assert [letter.reason for letter in letters] == ["invalid_event"] * 3
    assert [letter.attempts for letter in letters] == [1, 1, 1]
    assert letters[0].event == {ENTRY_FIELD: "[" * 100_000 + "]" * 100_000}
    assert letters[2].event[ENTRY_FIELD].endswith('"subject": "\\xff"}')  # the byte, as an escape
    props, _ = await deployment.storage.load("after")
    assert props["n"] == 1


async def test_an_entry_whose_turn_fails_unexpectedly_is_dead_lettered_after_max_deliveries(
    deployment: Deployment,
) -> None:
    process = deployment.engine.process
    tries: list[str] = []

    async def failing(event: Event, *args: object, **kwargs: object) -> object:
        if event.subject == "boom":
            tries.append(event.id)
            raise KeyError("not a storage error")
        return await process(event, *args, **kwargs)  # type: ignore[arg-type]

    deployment.engine.process = failing  # type: ignore[method-assign]
    boom = deployment.engine.new_event("count.inc", "boom", {})
    await deployment.streams.send([boom, deployment.engine.new_event("count.inc", "after", {})])
    await wait_until(deployment.drained)
    [letter] = await DeadLetters(deployment.storage).list()
    limit = deployment.engine.settings.max_deliveries
    assert (letter.reason, letter.attempts, letter.event_id) == ("max_deliveries", limit, boom.id)
    assert letter.error["type"] == "KeyError"
    assert tries == [boom.id] * limit
    props, _ = await deployment.storage.load("after")
    assert props["n"] == 1


async def test_a_handler_s_emit_to_another_partition_carries_its_extensions_and_refuses_local_metadata() -> (
    None
):
    settings = Settings(partitions=PARTITIONS, stream_block_ms=20, claim_idle_ms=200)
    storage = MemoryStorage()
    container = KRulesContainer()
    container.settings.override(providers.Object(settings))
    container.subject_storage.override(providers.Object(storage))
    on, _when, _middleware, _emit = container.handlers()
    refused: list[str] = []
    shipped: list[tuple[object, object]] = []

    @on("order.placed")  # order-1 is in partition 1, ship-1 in partition 0
    async def ship(ctx: EventContext) -> None:
        try:
            await ctx.emit("order.shipped", {}, "ship-1", dispatch_url="https://x")
        except Exception as exc:
            refused.append(str(exc))
        await ctx.emit("order.shipped", {}, "ship-1", topic="orders")

    @on("order.shipped")
    async def arrived(ctx: EventContext) -> None:
        shipped.append((ctx.get_metadata("topic"), ctx.get_metadata("dispatch_url")))

    engine: Engine = container.engine()
    streams = MemoryStreams(storage, PARTITIONS)
    engine.transport = streams
    worker = PartitionWorker(engine, streams)
    await engine.start()
    task = asyncio.ensure_future(worker.run())
    try:
        assert (partition_of("order-1", PARTITIONS), partition_of("ship-1", PARTITIONS)) == (1, 0)
        await engine.emit("order.placed", "order-1", {})

        async def has_shipped() -> bool:
            return bool(shipped)

        await wait_until(has_shipped)
    finally:
        worker.stop()
        await task
        await engine.close()

    assert shipped == [("orders", None)]
    assert len(refused) == 1 and refused[0].startswith(
        "Event 'order.shipped' goes through a partition stream, which carries CloudEvents extensions only, "
        "so dispatch_url= would not reach its handlers;"
    )
