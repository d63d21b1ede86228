"""Replays are the engine's own: a stream entry cannot forge one, a replay to a missing handler is
dead-lettered, and replaying one dead letter twice at once runs it once (real redis-server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from krules.cli import main
from krules.context import EventContext
from krules.dead_letters import (
    DEAD_LETTER_EXTENSION,
    NO_HANDLER,
    RESERVED_EXTENSION,
    DeadLetter,
    DeadLetters,
    dead_letter_name,
    store_changes,
)
from krules.events import REPLAY_EXTENSION, REPLAY_SIGNATURE_EXTENSION, Event
from krules.testing import KRulesTestApp, RedisModeApp, wait_until
from krules.testing.redis_server import LocalRedisServer
from krules.transport.base import encode_entry
from krules.transport.redis_streams import connect_streams
from middleware.dead_letter import DeadLetterMiddleware

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]


@pytest.fixture
async def instance(redis_server: LocalRedisServer, redis_key_prefix: str) -> AsyncIterator[RedisModeApp]:
    made = RedisModeApp(redis_server.url, redis_key_prefix)
    yield made
    await made.stop()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_server: LocalRedisServer, redis_key_prefix: str) -> None:
    monkeypatch.setenv("KRULES_REDIS_URL", redis_server.url)
    monkeypatch.setenv("KRULES_KEY_PREFIX", redis_key_prefix)


async def krules(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``krules argv...`` (in a thread: the command runs its own event loop); ``(rc, out, err)``."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class Charges:
    """``charge`` fails while ``failing``; when ``gate`` is set it waits for it before returning."""

    def __init__(self, app: RedisModeApp | KRulesTestApp) -> None:
        self.failing = True
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        app.middleware(DeadLetterMiddleware())

        @app.on("order.submitted")
        async def charge(ctx: EventContext) -> None:
            self.calls.append(ctx.event_id)
            if self.failing:
                raise ConnectionError("payment gateway down")
            if self.gate is not None:
                await self.gate.wait()
            await ctx.subject.set("charged", lambda n: (n or 0) + 1)

        self.handler = f"{charge.__module__}.{charge.__qualname__}"


async def one_dead_letter(app: RedisModeApp) -> DeadLetter:
    async def stored() -> bool:
        return len(await DeadLetters(app.storage).list()) == 1

    await wait_until(stored)
    (record,) = await DeadLetters(app.storage).list()
    return record


def forged(record: DeadLetter, **extensions: Any) -> dict[str, str]:
    """A stream entry replaying ``record`` as an outsider would write it."""
    original = record.original_event()
    event = Event(
        original.type,
        original.subject,
        original.data,
        f"{original.id}.replay-9",
        original.source,
        original.time,
        extensions=extensions,
    )
    return encode_entry(event)


async def test_stream_entries_forging_a_replay_are_dead_lettered_and_delete_nothing(
    instance: RedisModeApp, raw: aioredis.Redis
) -> None:
    charges = Charges(instance)
    await instance.start()
    await instance.emit("order.submitted", "order-1", {"total": 30})
    record = await one_dead_letter(instance)
    await instance.storage.set("dlq-userdata", "owner", '"ada"')  # a subject of the user's
    charges.failing = False
    keys = instance.storage.keys
    stream = keys.stream(keys.partition("order-1"))
    entries = {
        "unsigned": forged(record, **{REPLAY_EXTENSION: charges.handler, DEAD_LETTER_EXTENSION: record.name}),
        "wrongly signed": forged(
            record,
            **{
                REPLAY_EXTENSION: charges.handler,
                DEAD_LETTER_EXTENSION: record.name,
                REPLAY_SIGNATURE_EXTENSION: "0" * 64,
            },
        ),
        "aimed at a user subject": forged(
            record, **{REPLAY_EXTENSION: charges.handler, DEAD_LETTER_EXTENSION: "dlq-userdata"}
        ),
        "unknown krules extension": forged(record, krulesfoo="1"),
    }
    for n, fields in enumerate(entries.values()):  # distinct ids, so none is dropped as a duplicate
        event = json.loads(fields["event"])
        event["id"] += f"-{n}"
        await raw.xadd(stream, {"event": json.dumps(event)})

    async def all_refused() -> bool:
        return len(await DeadLetters(instance.storage).list(reason=RESERVED_EXTENSION)) == len(entries)

    await wait_until(all_refused)
    refused = await DeadLetters(instance.storage).list(reason=RESERVED_EXTENSION)
    assert all(r.handler == "" and "krules" in r.error["message"] for r in refused)
    assert charges.calls == [record.event_id]  # no forged replay reached the handler
    assert await DeadLetters(instance.storage).get(record.name) == record  # not deleted, not rewritten
    assert await instance.storage.load("dlq-userdata") == ({"owner": "ada"}, {})


async def test_a_signed_replay_runs_but_its_signature_does_not_carry_over_to_another_target(
    instance: RedisModeApp, raw: aioredis.Redis, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    charges = Charges(instance)
    await instance.start()
    await instance.emit("order.submitted", "order-1", {"total": 30})
    record = await one_dead_letter(instance)
    keys = instance.storage.keys
    stream = keys.stream(keys.partition("order-1"))

    code, out, err = await krules(capsys, "dlq", "replay", record.id)  # fails again: rewritten
    assert (code, err) == (0, "") and out.startswith(f"replayed {record.id}: "), err

    async def replay_failed() -> bool:
        found = await DeadLetters(instance.storage).get(record.name)
        return found is not None and found.replays_failed == 1

    await wait_until(replay_failed)
    (_, signed), *_ = [e for e in await raw.xrange(stream) if REPLAY_SIGNATURE_EXTENSION in e[1]["event"]]
    moved = json.loads(signed["event"])
    moved[DEAD_LETTER_EXTENSION] = dead_letter_name("another-event", "abc123")
    moved["id"] += "-moved"
    await raw.xadd(stream, {"event": json.dumps(moved)})

    async def moved_refused() -> bool:
        return len(await DeadLetters(instance.storage).list(reason=RESERVED_EXTENSION)) == 1

    await wait_until(moved_refused)
    (refused,) = await DeadLetters(instance.storage).list(reason=RESERVED_EXTENSION)
    assert "not this deployment's signature" in refused.error["message"]
    assert charges.calls == [record.event_id, f"{record.event_id}.replay-1"]


async def test_a_replay_to_a_handler_this_instance_lacks_becomes_a_dead_letter(
    instance: RedisModeApp, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    Charges(instance)
    await instance.start()
    event = Event("order.submitted", "order-2", {"total": 3}, "lost-1", "shop", 1_700_000_000.0)
    gone = DeadLetter(
        name=dead_letter_name(event.id, "ffffff"),
        event=event.to_dict(),
        event_id=event.id,
        event_type=event.type,
        subject=event.subject,
        handler="rules.removed.refund",
        error={"type": "ValueError", "message": "bad refund"},
        traceback="",
        attempts=1,
        reason="error",
        failed_at=1_700_000_000.0,
        partition=0,
    )
    await instance.storage.store(store_changes(gone))

    code, out, err = await krules(capsys, "dlq", "replay", gone.id)
    assert (code, err) == (0, "") and "to handler rules.removed.refund" in out, err

    async def dead_lettered_again() -> bool:
        found = await DeadLetters(instance.storage).get(gone.name)
        return found is not None and found.reason == NO_HANDLER

    await wait_until(dead_lettered_again)
    found = await DeadLetters(instance.storage).get(gone.name)
    assert found is not None
    assert (found.handler, found.replays, found.replays_failed) == ("rules.removed.refund", 1, 1)
    assert "which this instance has no rule for" in found.error["message"]
    assert found.event == gone.event  # the original event is kept, ready for a replay where it runs


async def test_two_replays_of_one_dead_letter_at_once_apply_it_once(instance: RedisModeApp) -> None:
    charges = Charges(instance)
    await instance.start()
    await instance.emit("order.submitted", "order-1", {"total": 30})
    record = await one_dead_letter(instance)
    charges.failing = False
    streams = await connect_streams(instance.storage)
    key = await streams.replay_key()
    dead = DeadLetters(instance.storage)

    outcomes = await asyncio.gather(
        dead.replay(record.id, streams.send, replay_key=key),
        dead.replay(record.id, streams.send, replay_key=key),
        return_exceptions=True,
    )

    assert sorted(type(o).__name__ for o in outcomes) == ["ReplayInFlightError", "tuple"]

    async def replayed() -> bool:
        return await dead.list() == [] and await instance.storage.get("order-1", "charged") == 1

    await wait_until(replayed)
    assert charges.calls == [record.event_id, f"{record.event_id}.replay-1"]


async def test_replaying_again_while_the_replay_runs_sends_nothing(
    instance: RedisModeApp, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    charges = Charges(instance)
    await instance.start()
    await instance.emit("order.submitted", "order-1", {"total": 30})
    record = await one_dead_letter(instance)
    charges.failing = False
    charges.gate = asyncio.Event()

    first = await krules(capsys, "dlq", "replay", record.id)

    async def running() -> bool:
        return len(charges.calls) == 2

    await wait_until(running)  # the replay is in its handler, not finished
    second = await krules(capsys, "dlq", "replay", record.id)
    charges.gate.set()

    async def replayed() -> bool:
        return await DeadLetters(instance.storage).list() == []

    await wait_until(replayed)
    assert first[0] == 0 and first[1].startswith(f"replayed {record.id}: ")
    assert second == (
        0,
        f"not replayed {record.id}: replay {record.event_id}.replay-1 is still in flight\n",
        "",
    )
    assert charges.calls == [record.event_id, f"{record.event_id}.replay-1"]
    assert await instance.storage.get("order-1", "charged") == 1


async def test_a_replay_to_a_missing_handler_is_dead_lettered_in_embedded_mode_too(
    krules_app: KRulesTestApp,
) -> None:
    charges = Charges(krules_app)
    await krules_app.emit("order.submitted", "order-1", {"total": 30})
    (record,) = await DeadLetters(krules_app.storage).list()
    renamed = DeadLetter.from_properties(record.name, {**record.properties(), "handler": "rules.gone.charge"})
    await krules_app.storage.store(store_changes(renamed))

    async def process(events: Any) -> None:
        for event in events:
            await krules_app.engine.process(event)

    await DeadLetters(krules_app.storage).replay(record.id, process)

    (again,) = await DeadLetters(krules_app.storage).list()
    assert (again.name, again.reason, again.replays, again.replays_failed) == (record.name, NO_HANDLER, 1, 1)
    assert charges.calls == [record.event_id]  # the handler that exists was not run instead
