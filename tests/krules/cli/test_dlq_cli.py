"""``krules dlq`` end to end on a real redis-server: a Redis-mode instance runs in-process with the
dead-letter middleware, and the commands run as ``krules.cli.main([...])`` against the same Redis."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from krules.cli import main
from krules.context import EventContext
from krules.dead_letters import INDEX_SUBJECT, DeadLetter, DeadLetters, dead_letter_name, store_changes
from krules.testing import RedisModeApp, wait_until
from krules.testing.redis_server import LocalRedisServer
from middleware.dead_letter import DeadLetterMiddleware
from storage.redis.keys import CONSUMER_GROUP, KeySchema

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]


Instance = RedisModeApp


@pytest.fixture
async def instance(redis_server: LocalRedisServer, redis_key_prefix: str) -> AsyncIterator[Instance]:
    made = Instance(redis_server.url, redis_key_prefix)
    yield made
    await made.stop()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_server: LocalRedisServer, redis_key_prefix: str) -> None:
    monkeypatch.setenv("KRULES_REDIS_URL", redis_server.url)
    monkeypatch.setenv("KRULES_KEY_PREFIX", redis_key_prefix)


eventually = wait_until


async def krules(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``krules argv...`` (in a thread: the command runs its own event loop); ``(rc, out, err)``."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class Orders:
    """A handler that fails until ``failing`` is cleared, and another one on the same event."""

    def __init__(self, instance: Instance) -> None:
        self.failing = True
        self.charged: list[str] = []
        self.notified: list[str] = []
        instance.middleware(DeadLetterMiddleware())

        @instance.on("order.submitted")
        async def charge(ctx: EventContext) -> None:
            self.charged.append(ctx.event_id)
            if self.failing:
                raise ConnectionError("payment gateway down")
            await ctx.subject.set("charged", True)

        @instance.on("order.submitted")
        async def notify(ctx: EventContext) -> None:
            self.notified.append(ctx.event_id)

        self.handler = f"{charge.__module__}.{charge.__qualname__}"


def dead_letters(instance: Instance) -> DeadLetters:
    return DeadLetters(instance.storage)


async def test_a_failed_handler_is_listed_shown_and_replayed_to_that_handler_only(
    instance: Instance, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    orders = Orders(instance)
    await instance.start()
    await instance.emit("order.submitted", "order-1", {"total": 30})

    async def one_dead_letter() -> bool:
        return len(await dead_letters(instance).list()) == 1

    await eventually(one_dead_letter)
    (record,) = await dead_letters(instance).list()
    assert record.handler == orders.handler and len(orders.notified) == 1

    code, out, err = await krules(capsys, "dlq", "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("1 dead letter(s) under key prefix")
    assert lines[1].split() == [
        "ID",
        "FAILED",
        "AT",
        "(UTC)",
        "REASON",
        "HANDLER",
        "EVENT",
        "TYPE",
        "SUBJECT",
        "ATTEMPTS",
        "REPLAYS",
        "ERROR",
    ]
    row = lines[2]
    for cell in (record.id, "error", orders.handler, "order.submitted", "order-1"):
        assert cell in row
    assert row.endswith("ConnectionError: payment gateway down")

    code, out, _ = await krules(capsys, "dlq", "list", "--handler", "*.notify", "--since", "1h")
    assert code == 0 and out.startswith("No dead letters match")
    code, out, _ = await krules(capsys, "dlq", "list", "--json")
    assert code == 0 and [r["name"] for r in json.loads(out)] == [record.name]

    code, out, _ = await krules(capsys, "dlq", "show", record.id[:8])
    shown = json.loads(out)
    assert code == 0
    assert shown["event"]["data"] == {"total": 30} and shown["event"]["subject"] == "order-1"
    assert "ConnectionError: payment gateway down" in shown["traceback"]
    assert (shown["handler"], shown["reason"], shown["attempts"]) == (orders.handler, "error", 1)

    orders.failing = False
    code, out, err = await krules(capsys, "dlq", "replay", record.id)
    assert (code, err) == (0, "")
    assert out.startswith(f"replayed {record.id}: order.submitted for subject 'order-1' to handler ")

    async def gone() -> bool:
        return await dead_letters(instance).list() == []

    await eventually(gone)
    assert orders.charged[1] == f"{record.event_id}.replay-1"
    assert len(orders.charged) == 2 and len(orders.notified) == 1  # the other handler did not run again
    assert await instance.storage.get("order-1", "charged") is True
    assert await instance.storage.load(record.name) == ({}, {})
    assert await dead_letters(instance).index() == {}


async def test_an_invalid_stream_entry_is_listed_but_its_replay_is_refused_in_one_sentence(
    instance: Instance, env: None, raw: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    Orders(instance)
    await instance.start()
    await raw.xadd(instance.storage.keys.stream(1), {"event": "{not json"})

    async def parked() -> bool:
        return len(await dead_letters(instance).list(reason="invalid_event")) == 1

    await eventually(parked)
    code, out, _ = await krules(capsys, "dlq", "list", "--reason", "invalid_event")
    assert code == 0
    (row,) = out.splitlines()[2:]
    assert "invalid_event" in row
    assert "EventFormatError: The stream entry's 'event' field is not valid JSON" in row
    entry_id = row.split()[0]

    code, out, _ = await krules(capsys, "dlq", "show", entry_id)
    assert code == 0 and json.loads(out)["event"] == {"event": "{not json"}

    code, out, err = await krules(capsys, "dlq", "replay", entry_id)
    assert code == 1 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("krules: error: Dead letter 'dlq-") and "cannot be replayed because" in line
    assert "Traceback" not in err
    assert len(await dead_letters(instance).list()) == 1  # still there, still listed


async def test_purge_removes_the_old_dead_letters_only_and_asks_first(
    instance: Instance, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    await instance.start()  # records the partition count the commands read
    storage = instance.storage
    now = time.time()
    old, recent = (
        DeadLetter.from_properties(
            dead_letter_name(event_id, "abc123"),
            {"event_id": event_id, "handler": "rules.x", "reason": "error", "failed_at": at},
        )
        for event_id, at in (("old", now - 3 * 86_400), ("recent", now - 60))
    )
    await storage.store([*store_changes(old), *store_changes(recent)])

    code, _, err = await krules(capsys, "dlq", "purge", "--older-than", "1d")
    assert code == 2 and "This would delete 1 dead letter(s) that failed more than 1d ago" in err
    assert "--yes" in err

    code, out, _ = await krules(capsys, "dlq", "purge", "--older-than", "1d", "--yes")
    assert (code, out) == (0, "Deleted 1 dead letter(s) that failed more than 1d ago.\n")
    assert [r.name for r in await dead_letters(instance).list()] == [recent.name]
    assert await storage.load(old.name) == ({}, {})
    props, _ = await storage.load(INDEX_SUBJECT)
    assert list(props) == [recent.name]

    code, _, err = await krules(capsys, "dlq", "purge", "--older-than", "soon", "--yes")
    assert code == 2 and err.startswith("krules: error: --older-than 'soon' is not a duration")


async def test_replay_needs_redis_mode_and_the_commands_known_ids(
    monkeypatch: pytest.MonkeyPatch, instance: Instance, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    await instance.start()
    code, _, err = await krules(capsys, "dlq", "show", "0123456789abcdef")
    assert code == 1
    assert err == (
        "krules: error: There is no dead letter '0123456789abcdef'; "
        "'krules dlq list' shows the ids of those stored.\n"
    )
    code, _, err = await krules(capsys, "dlq", "replay")
    assert code == 2 and "either one dead letter ID or --all" in err

    monkeypatch.delenv("KRULES_REDIS_URL")
    code, _, err = await krules(capsys, "dlq", "replay", "0123456789abcdef")
    assert code == 2
    assert err.startswith(
        "krules: error: 'krules dlq replay' reads a Redis-mode deployment; set KRULES_REDIS_URL"
    )
    assert len(err.splitlines()) == 1
    with socket.socket() as sock:  # without Redis, list asks the running instance: none here
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    code, _, err = await krules(capsys, "dlq", "list", "--url", url)
    assert code == 1 and err.startswith(f"krules: error: Cannot reach the krules instance at {url}")
    assert len(err.splitlines()) == 1


async def test_a_bug_in_an_outer_middleware_is_dead_lettered_and_acknowledged_in_redis_mode(
    instance: Instance, raw: aioredis.Redis, env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    async def buggy(ctx: EventContext, next: Any) -> None:  # outermost: the dead-letter one never sees it
        raise KeyError("bug in an outer middleware")

    instance.middleware(buggy)
    instance.middleware(DeadLetterMiddleware())
    charged: list[str] = []

    @instance.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        charged.append(ctx.event_id)

    await instance.start()
    await instance.emit("order.submitted", "order-1", {"total": 30})

    async def one_dead_letter() -> bool:
        return len(await dead_letters(instance).list()) == 1

    await eventually(one_dead_letter)
    (record,) = await dead_letters(instance).list()
    assert charged == [] and record.reason == "error"
    assert record.error_line == "KeyError: 'bug in an outer middleware'"
    keys = KeySchema(instance.settings.key_prefix, instance.settings.partitions)

    async def acknowledged() -> bool:
        pending = [await raw.xpending(keys.stream(p), CONSUMER_GROUP) for p in range(keys.partitions)]
        return all(summary["pending"] == 0 for summary in pending)

    await eventually(acknowledged)  # committed with its dead letter, not left to be taken again
    code, out, _ = await krules(capsys, "dlq", "show", record.id)
    assert code == 0 and json.loads(out)["event"]["data"] == {"total": 30}
