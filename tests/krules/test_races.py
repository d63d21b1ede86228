"""Concurrency inside one turn: handlers sharing a cached subject against a storage that awaits I/O."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from krules.context import EventContext
from krules.testing import KRulesTestApp
from krules.testing.redis_server import LocalRedisServer
from storage.base import SubjectChanges
from storage.memory import MemoryStorage
from storage.redis import create_redis_storage


class NetworkLikeStorage(MemoryStorage):
    """Memory storage whose calls take a round trip: the batch is serialised, then sent after an await."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = asyncio.Event()

    async def load(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        result = await super().load(name)
        await asyncio.sleep(0)
        return result

    async def store(self, batch: Sequence[SubjectChanges]) -> None:
        snapshot = [SubjectChanges(c.name, dict(c.props), dict(c.ext)) for c in batch]
        self.in_flight.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        self.in_flight.clear()
        await super().store(snapshot)


async def test_two_handlers_loading_one_subject_at_once_lose_no_increment() -> None:
    async with KRulesTestApp(storage=NetworkLikeStorage()) as app:
        for name in ("inc_a", "inc_b"):

            async def inc(ctx: EventContext) -> None:
                await ctx.subject.set("n", lambda n: (n or 0) + 1, muted=True)

            inc.__qualname__ = name
            app.on("tick")(inc)
        for _ in range(5):
            await app.emit("tick", "counter")
        assert await app.stored("counter") == {"n": 10}


async def test_a_write_made_while_another_handler_stores_is_not_lost() -> None:
    async with KRulesTestApp(storage=NetworkLikeStorage()) as app:
        storage = app.storage
        assert isinstance(storage, NetworkLikeStorage)

        @app.on("go")
        async def storer(ctx: EventContext) -> None:
            await ctx.subject.set("a", 1, muted=True)
            await ctx.subject.store()

        @app.on("go")
        async def writer(ctx: EventContext) -> None:
            await storage.in_flight.wait()  # the other handler's store() is on the wire
            await ctx.subject.set("b", 2, muted=True)

        await app.emit("go", "s")
        assert await app.stored("s") == {"a": 1, "b": 2}


class FailingOnceStorage(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def store(self, batch: Sequence[SubjectChanges]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("storage went away")
        await super().store(batch)


async def test_changes_whose_store_failed_are_kept_for_the_next_store() -> None:
    async with KRulesTestApp(storage=FailingOnceStorage()) as app:
        s = app.subject("s")
        await s.set("a", 1, muted=True)
        await s.set("n", lambda n: (n or 0) + 1, muted=True)
        with pytest.raises(ConnectionError):
            await s.store()
        await s.set("n", lambda n: n + 1, muted=True)
        await s.store()
        assert await app.stored("s") == {"a": 1, "n": 2}


@pytest.mark.redis_server
async def test_on_a_real_redis_two_handlers_incrementing_one_subject_lose_nothing(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    storage = create_redis_storage(url=redis_server.url, key_prefix=redis_key_prefix)
    async with KRulesTestApp(storage=storage) as app:
        for name in ("inc_a", "inc_b"):

            async def inc(ctx: EventContext) -> None:
                await ctx.subject.set("n", lambda n: (n or 0) + 1, muted=True)

            inc.__qualname__ = name
            app.on("tick")(inc)
        await asyncio.gather(*(app.emit("tick", "counter") for _ in range(10)))
        assert await app.stored("counter") == {"n": 20}
