"""Dead-letter records, their index by time, and the manager behind ``krules dlq`` (memory storage)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from krules.dead_letters import (
    DEAD_LETTER_EXTENSION,
    DeadLetter,
    DeadLetters,
    dead_letter_name,
    entry_dead_letter,
    store_changes,
)
from krules.errors import DeadLetterError, ReplayInFlightError
from krules.events import REPLAY_EXTENSION, Event
from krules.transport.base import Delivery, decode_entry, encode_entry
from storage.memory import MemoryStorage

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(
    event_id: str = "ev-1",
    *,
    handler: str = "rules.orders.charge",
    key: str = "abc123",
    event_type: str = "order.submitted",
    subject: str = "order-1",
    reason: str = "error",
    failed_at: float = T0,
) -> DeadLetter:
    event = Event(event_type, subject, {"total": 30}, event_id, "shop", T0 - 5, extensions={"tenant": "acme"})
    return DeadLetter(
        name=dead_letter_name(event_id, key),
        event=event.to_dict(),
        event_id=event_id,
        event_type=event_type,
        subject=subject,
        handler=handler,
        error={"type": "ConnectionError", "message": "payment gateway down"},
        traceback="Traceback (most recent call last):\n  ...\nConnectionError: payment gateway down\n",
        attempts=3,
        reason=reason,
        failed_at=failed_at,
        partition=0,
    )


async def stored(storage: MemoryStorage, *records: DeadLetter) -> DeadLetters:
    for r in records:
        await storage.store(store_changes(r))
    return DeadLetters(storage, clock=Clock(T0 + 3600))


class Sent:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, events: Sequence[Event]) -> None:
        self.events.extend(events)


def test_names_are_deterministic_per_event_and_handler() -> None:
    name = dead_letter_name("ev-1", "abc123")
    assert name == dead_letter_name("ev-1", "abc123")
    assert name.startswith("dlq-") and len(name) == len("dlq-") + 16
    assert name != dead_letter_name("ev-1", "def456")
    assert name != dead_letter_name("ev-2", "abc123")
    assert dead_letter_name("ev-1") != name  # the worker's (no handler) is another entry


async def test_a_stored_record_reads_back_whole_and_is_indexed_by_its_time() -> None:
    storage = MemoryStorage()
    original = record()
    dead = await stored(storage, original)

    assert await dead.get(original.name) == original
    assert await dead.index() == {original.name: T0}
    props, _ = await storage.load(original.name)
    assert props["event"]["data"] == {"total": 30}  # the payload is kept, unlike the KRules snippet
    assert props["error"] == {"type": "ConnectionError", "message": "payment gateway down"}
    assert original.to_dict()["id"] == original.id == original.name.removeprefix("dlq-")


async def test_listing_filters_by_handler_type_reason_and_time_oldest_first() -> None:
    storage = MemoryStorage()
    a = record("a", failed_at=T0 + 20)
    b = record("b", handler="rules.orders.ship", event_type="order.paid", failed_at=T0 + 10, reason="timeout")
    c = record("c", handler="rules.stock.reserve", event_type="stock.low", failed_at=T0 + 30)
    dead = await stored(storage, a, b, c)

    def ids(found: Sequence[DeadLetter]) -> list[str]:
        return [r.event_id for r in found]

    assert ids(await dead.list()) == ["b", "a", "c"]
    assert ids(await dead.list(handler="rules.orders.charge")) == ["a"]
    assert ids(await dead.list(handler="rules.orders.*")) == ["b", "a"]
    assert ids(await dead.list(event_type="order.*")) == ["b", "a"]
    assert ids(await dead.list(reason="timeout")) == ["b"]
    assert ids(await dead.list(since=T0 + 20)) == ["a", "c"]
    assert ids(await dead.list(until=T0 + 20)) == ["b"]
    assert ids(await dead.list(since=T0 + 15, until=T0 + 25, handler="rules.orders.*")) == ["a"]


async def test_an_index_line_without_its_entry_is_skipped() -> None:
    storage = MemoryStorage()
    kept, lost = record("kept"), record("lost")
    dead = await stored(storage, kept, lost)
    await storage.flush(lost.name)  # e.g. a crash between deleting the entry and its index line
    assert [r.name for r in await dead.list()] == [kept.name]


async def test_find_takes_the_name_the_id_or_an_unambiguous_start() -> None:
    storage = MemoryStorage()
    r = record()
    dead = await stored(storage, r)
    assert (await dead.find(r.name)).name == r.name
    assert (await dead.find(r.id)).name == r.name
    assert (await dead.find(r.id[:6])).name == r.name
    with pytest.raises(DeadLetterError, match=r"^There is no dead letter 'nope'; 'krules dlq list'"):
        await dead.find("nope")
    with pytest.raises(DeadLetterError):
        await dead.find("index")  # the index is not a dead letter


async def test_an_ambiguous_start_of_an_id_is_refused() -> None:
    storage = MemoryStorage()
    records = [record(f"ev-{i}") for i in range(40)]
    dead = await stored(storage, *records)
    first = records[0].id[0]
    with pytest.raises(DeadLetterError, match="is ambiguous"):
        await dead.find(first)


async def test_purge_removes_entries_older_than_the_age_and_their_index_lines() -> None:
    storage = MemoryStorage()
    old, recent = record("old", failed_at=T0), record("recent", failed_at=T0 + 3000)
    dead = await stored(storage, old, recent)  # its clock says T0 + 3600

    assert await dead.purge(older_than=1800) == [old.name]
    assert await storage.load(old.name) == ({}, {})
    assert await dead.index() == {recent.name: T0 + 3000}
    assert await dead.purge() == [recent.name]
    assert await storage.subjects("dlq-") == []


async def test_delete_removes_one_entry() -> None:
    storage = MemoryStorage()
    r = record()
    dead = await stored(storage, r)
    assert await dead.delete(r.name) is True
    assert await dead.delete(r.name) is False
    assert await storage.subjects() == []


async def test_a_replay_sends_the_original_event_with_a_new_id_for_the_failed_handler_only() -> None:
    storage = MemoryStorage()
    r = record()
    dead = await stored(storage, r)
    sent = Sent()

    counted, event = await dead.replay(r.id, sent)
    with pytest.raises(ReplayInFlightError, match=r"has replay 1 in flight \(event ev-1\.replay-1\)"):
        await dead.replay(r.id, sent)  # the first has neither succeeded nor failed yet
    again, second = await dead.replay(r.id, sent, force=True)

    assert sent.events == [event, second]
    assert (event.id, second.id) == ("ev-1.replay-1", "ev-1.replay-2")
    assert (event.type, event.subject, event.data, event.source) == (
        "order.submitted",
        "order-1",
        {"total": 30},
        "shop",
    )
    assert event.extensions == {"tenant": "acme", REPLAY_EXTENSION: r.handler, DEAD_LETTER_EXTENSION: r.name}
    assert (counted.replays, again.replays) == (1, 2)
    stored_record = await dead.get(r.name)
    assert stored_record is not None and stored_record.replays == 2 and stored_record.replayed_at == T0 + 3600


async def test_an_entry_that_is_not_an_event_is_kept_listed_but_cannot_be_replayed() -> None:
    storage = MemoryStorage()
    delivery = Delivery(1, "1700000000000-0", {"event": '{"id": "x", "type": "t"'}, None, "not JSON")
    invalid = entry_dead_letter(
        delivery, "invalid_event", "The stream entry's 'event' field is not valid JSON.", T0
    )
    dead = await stored(storage, invalid)
    sent = Sent()

    (listed,) = await dead.list(reason="invalid_event")
    assert listed.event == {"event": '{"id": "x", "type": "t"'}  # the raw entry, as received
    assert (listed.handler, listed.partition, listed.entry_id) == ("", 1, "1700000000000-0")
    with pytest.raises(DeadLetterError, match=r"^Dead letter 'dlq-\w+' cannot be replayed because it holds"):
        await dead.replay(listed.id, sent)
    assert sent.events == []
    assert (await dead.get(listed.name)) == listed  # not counted as replayed


async def test_an_entry_that_reached_no_handler_is_replayed_to_every_handler_and_deleted() -> None:
    storage = MemoryStorage()
    event = Event("order.submitted", "order-1", {"total": 1}, "poison-1", "shop", T0)
    fields = encode_entry(event)
    delivery = Delivery(0, "1-0", fields, decode_entry(fields), deliveries=6)
    parked = entry_dead_letter(delivery, "max_deliveries", "Delivered 6 times.", T0)
    assert (parked.name, parked.attempts, parked.event_id) == (dead_letter_name("poison-1"), 6, "poison-1")
    dead = await stored(storage, parked)
    sent = Sent()

    _, replayed = await dead.replay(parked.id, sent)
    assert replayed.id == "poison-1.replay-1" and replayed.extensions is None
    assert await dead.list() == []


@pytest.mark.parametrize(
    "props",
    [{}, {"error": "plain text", "attempts": "3", "failed_at": "yesterday", "event": [1]}],
    ids=["empty", "edited_by_hand"],
)
def test_a_record_edited_by_hand_reads_back_with_defaults(props: dict[str, Any]) -> None:
    r = DeadLetter.from_properties("dlq-x", props)
    assert (r.attempts, r.failed_at, r.event, r.replays, r.partition) == (1, 0.0, {}, 0, None)
    assert r.error["message"] == props.get("error", "")
