"""Timers in Redis mode: stored with the commit in the partition's slot, moved into the stream by the
partition's owner exactly once, handled as effectively-once turns (on a real redis-server)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from krules.context import EventContext
from krules.errors import StorageError
from krules.events import Event
from krules.testing import RedisModeApp, wait_until
from krules.testing.redis_server import LocalRedisServer
from krules.timers import EXPIRE_KEY, SUBJECT_EXPIRED, TIMER_EXTENSION
from krules.transport.base import encode_entry

FAST: dict[str, Any] = {"timer_poll_ms": 10, "lease_ms": 2000, "lease_renew_ms": 200}


async def test_many_timers_over_many_subjects_each_fire_exactly_once(
    redis_server: LocalRedisServer, redis_key_prefix: str, raw: aioredis.Redis
) -> None:
    subjects, per_subject = 1_000, 10  # 10,000 timers, due within about a second
    app = RedisModeApp(redis_server.url, redis_key_prefix, partitions=4, **FAST)
    fired: collections.Counter[tuple[str, str]] = collections.Counter()

    @app.on("plan")
    async def plan(ctx: EventContext) -> None:
        for i in range(per_subject):
            await ctx.subject.schedule("ding", after=1.0 + i * 0.08, key=f"k{i}", payload={"i": i})

    @app.on("ding")
    async def ding(ctx: EventContext) -> None:
        fired[ctx.subject.name, str(ctx.timer_key)] += 1
        await ctx.subject.set("dings", lambda n: (n or 0) + 1)

    await app.start()
    try:
        for s in range(subjects):
            await app.emit("plan", f"device-{s}")

        async def all_fired() -> bool:
            return len(fired) == subjects * per_subject

        await wait_until(all_fired, timeout=60)
        await asyncio.sleep(0.3)  # a duplicate would show up meanwhile
        assert set(fired.values()) == {1}
        assert await app.storage.all_timers() == []
        assert [await raw.zcard(f"{redis_key_prefix}{{p{p}}}:timers") for p in range(4)] == [0] * 4
        assert [await raw.hlen(f"{redis_key_prefix}{{p{p}}}:timer-records") for p in range(4)] == [0] * 4
        dings = [
            await raw.hget(
                f"{redis_key_prefix}{{p{app.storage.keys.partition(f'device-{s}')}}}:s:device-{s}", "p:dings"
            )
            for s in range(subjects)
        ]
        assert dings == [str(per_subject)] * subjects
    finally:
        await app.stop()


async def test_rescheduling_a_key_replaces_it_and_a_cancel_in_the_same_turn_leaves_nothing(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    app = RedisModeApp(redis_server.url, redis_key_prefix, **FAST)
    fired: list[tuple[str, Any]] = []
    listed: list[Any] = []

    @app.on("arm")
    async def arm(ctx: EventContext) -> None:
        await ctx.subject.schedule("alarm", after=ctx.payload["after"], key="alarm", payload=ctx.payload)
        if ctx.payload.get("undo"):
            await ctx.subject.cancel_schedule("alarm")

    @app.on("look")
    async def look(ctx: EventContext) -> None:
        listed.append([(t["key"], t["payload"]) for t in await ctx.subject.schedules()])

    @app.on("alarm")
    async def alarm(ctx: EventContext) -> None:
        fired.append((ctx.subject.name, ctx.payload))

    await app.start()
    try:
        await app.emit("arm", "a", {"after": 30, "n": 1})
        await app.emit("arm", "a", {"after": 0.3, "n": 2})  # replaces the 30-second one
        await app.emit("arm", "b", {"after": 0.1, "undo": True})
        await app.emit("look", "a")

        async def fired_once() -> bool:
            return len(fired) == 1

        await wait_until(fired_once)
        await asyncio.sleep(0.5)
        assert fired == [("a", {"after": 0.3, "n": 2})]
        assert listed == [[("alarm", {"after": 0.3, "n": 2})]]
        assert await app.storage.all_timers() == []
    finally:
        await app.stop()


async def test_an_expired_subject_is_announced_then_deleted(
    redis_server: LocalRedisServer, redis_key_prefix: str, raw: aioredis.Redis
) -> None:
    app = RedisModeApp(redis_server.url, redis_key_prefix, **FAST)
    announced: list[Any] = []

    @app.on("login")
    async def login(ctx: EventContext) -> None:
        await ctx.subject.set("user", "ann")
        await ctx.subject.expire(after=0.2)

    @app.on(SUBJECT_EXPIRED)
    async def archive(ctx: EventContext) -> None:
        announced.append(ctx.payload)

    await app.start()
    try:
        await app.emit("login", "session-1")

        async def expired() -> bool:
            return bool(announced) and not await raw.exists(app.storage.keys.subject("session-1"))

        await wait_until(expired)
        assert announced == [{"props": {"user": "ann"}, "ext_props": {}}]
    finally:
        await app.stop()


async def test_timers_due_while_no_instance_ran_fire_on_restart_in_due_order(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    first = RedisModeApp(redis_server.url, redis_key_prefix, partitions=1, **FAST)

    @first.on("plan")
    async def plan(ctx: EventContext) -> None:
        for i in (3, 1, 2):
            await ctx.subject.schedule("tick", after=0.3 + i * 0.01, key=f"k{i}", payload={"i": i})

    await first.start()
    await first.emit("plan", "s")

    async def scheduled() -> bool:
        return len(await first.storage.all_timers()) == 3

    await wait_until(scheduled)
    await first.stop()
    await asyncio.sleep(0.5)  # all due now, and nobody runs

    second = RedisModeApp(redis_server.url, redis_key_prefix, partitions=1, **FAST)
    order: list[int] = []

    @second.on("tick")
    async def tick(ctx: EventContext) -> None:
        order.append(ctx.payload["i"])

    await second.start()
    try:

        async def all_fired() -> bool:
            return len(order) == 3

        await wait_until(all_fired)
        assert order == [1, 2, 3]
    finally:
        await second.stop()


async def test_no_timer_fires_twice_or_is_lost_while_partitions_move_between_two_instances(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    subjects, per_subject = 60, 10
    fired: collections.Counter[tuple[str, str]] = collections.Counter()
    settings = {**FAST, "partitions": 8, "partition_id": "auto"}

    def instance(name: str) -> RedisModeApp:
        app = RedisModeApp(redis_server.url, redis_key_prefix, consumer=name, **settings)

        @app.on("plan")
        async def plan(ctx: EventContext) -> None:
            for i in range(per_subject):
                await ctx.subject.schedule("ding", after=0.3 + i * 0.15, key=f"k{i}")

        @app.on("ding")
        async def ding(ctx: EventContext) -> None:
            fired[ctx.subject.name, str(ctx.timer_key)] += 1

        return app

    first = instance("first")
    await first.start()
    second = instance("second")
    try:
        for s in range(subjects):
            await first.emit("plan", f"device-{s}")

        async def some_fired() -> bool:
            return len(fired) >= subjects * 2

        await wait_until(some_fired)
        await second.start()  # takes a share of the partitions from the first

        async def shared() -> bool:
            return bool(second.worker.source.partitions) and len(first.worker.source.partitions) < 8

        await wait_until(shared)
        await first.stop()  # hands every partition back: the second takes them all

        async def all_fired() -> bool:
            return len(fired) == subjects * per_subject

        await wait_until(all_fired, timeout=30)
        await asyncio.sleep(0.3)
        assert set(fired.values()) == {1}
    finally:
        await first.stop()
        await second.stop()


async def test_metrics_count_each_firing_lag_and_the_pending_timers(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    app = RedisModeApp(redis_server.url, redis_key_prefix, middleware=True, partitions=1, **FAST)
    fired: list[str] = []

    @app.on("plan")
    async def plan(ctx: EventContext) -> None:
        await ctx.subject.schedule("soon", after=0.05, key="soon")
        await ctx.subject.schedule("later", after=3600, key="later")

    @app.on("soon")
    async def soon(ctx: EventContext) -> None:
        fired.append(ctx.subject.name)

    registry = app.instance.chain.metrics.registry
    await app.start()
    try:
        await app.emit("plan", "s")

        async def counted() -> bool:
            return registry.get_sample_value("krules_timers_pending", {"partition": "0"}) == 1.0 and bool(
                fired
            )

        await wait_until(counted)
        assert registry.get_sample_value("krules_timer_lag_seconds_count") == 1.0
    finally:
        await app.stop()


async def test_pending_timers_survive_a_redis_restart_with_an_append_only_file(
    redis_server_factory: Callable[..., LocalRedisServer], redis_key_prefix: str
) -> None:
    server = redis_server_factory(persistent=True)
    first = RedisModeApp(server.url, redis_key_prefix, partitions=2, **FAST)

    @first.on("plan")
    async def plan(ctx: EventContext) -> None:
        await ctx.subject.schedule("ding", after=0.5, key="k")

    await first.start()
    for s in range(20):
        await first.emit("plan", f"s-{s}")

    async def scheduled() -> bool:
        return len(await first.storage.all_timers()) == 20

    await wait_until(scheduled)
    await first.stop()
    server.restart(kill=True)  # a crash of Redis itself: only the append-only file is left

    second = RedisModeApp(server.url, redis_key_prefix, partitions=2, **FAST)
    fired: collections.Counter[str] = collections.Counter()

    @second.on("ding")
    async def ding(ctx: EventContext) -> None:
        fired[ctx.subject.name] += 1

    await second.start()
    try:

        async def all_fired() -> bool:
            return len(fired) == 20

        await wait_until(all_fired)
        await asyncio.sleep(0.2)
        assert set(fired.values()) == {1}
    finally:
        await second.stop()


async def test_a_timer_scheduled_for_a_subject_of_another_partition_fires_there(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    app = RedisModeApp(redis_server.url, redis_key_prefix, partitions=4, **FAST)
    keys = app.storage.keys
    here = "order-1"
    there = next(
        n for n in (f"customer-{i}" for i in range(100)) if keys.partition(n) != keys.partition(here)
    )
    fired: list[tuple[str, Any]] = []

    @app.on("order.placed")
    async def placed(ctx: EventContext) -> None:
        await ctx.turn.subject(there).schedule("customer.remind", after=0.1, payload={"order": here})

    @app.on("customer.remind")
    async def remind(ctx: EventContext) -> None:
        fired.append((ctx.subject.name, ctx.payload))

    await app.start()
    try:
        await app.emit("order.placed", here)

        async def reminded() -> bool:
            return bool(fired)

        await wait_until(reminded)
        assert fired == [(there, {"order": here})]
    finally:
        await app.stop()


class _Held:
    """A turn of a subject that holds the subject's lane until released, then runs ``then``."""

    def __init__(self) -> None:
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def hold(self) -> None:
        self.holding.set()
        await self.release.wait()


def _fired_markers(app: RedisModeApp, raw: aioredis.Redis) -> Callable[[], Awaitable[dict[str, str]]]:
    async def markers() -> dict[str, str]:
        return await raw.hgetall(app.storage.keys.timers_fired(0))  # type: ignore[no-any-return]

    return markers


async def _pending_entries(app: RedisModeApp, raw: aioredis.Redis) -> int:
    return int((await raw.xpending(app.storage.keys.stream(0), "krules"))["pending"])


async def test_a_timer_in_the_stream_cancelled_by_an_earlier_turn_of_its_subject_runs_nothing(
    redis_server: LocalRedisServer, redis_key_prefix: str, raw: aioredis.Redis
) -> None:
    app = RedisModeApp(redis_server.url, redis_key_prefix, partitions=1, **FAST)
    held = _Held()
    alarms: list[Any] = []
    markers = _fired_markers(app, raw)

    @app.on("order.paid")
    async def paid(ctx: EventContext) -> None:
        await held.hold()
        await ctx.subject.cancel_schedule("payment")

    @app.on("clock.arm")
    async def arm(ctx: EventContext) -> None:  # another subject: its turn runs while the order's is held
        await ctx.turn.subject("order-1").schedule("order.payment_timeout", after=0.05, key="payment")

    @app.on("order.payment_timeout")
    async def timeout(ctx: EventContext) -> None:
        alarms.append(ctx.payload)

    await app.start()
    try:
        await app.emit("order.paid", "order-1")
        await asyncio.wait_for(held.holding.wait(), 10)
        await app.emit("clock.arm", "clock")

        async def moved_into_the_stream() -> bool:
            return bool(await markers())

        await wait_until(moved_into_the_stream)
        held.release.set()  # the payment's turn cancels the timer, then the timer's turn runs

        async def recognised_as_stale() -> bool:
            return app.engine.stale_timers == 1 and await _pending_entries(app, raw) == 0

        await wait_until(recognised_as_stale)
        assert alarms == []
        assert await markers() == {}
        assert await app.storage.all_timers() == []
        assert await app.storage.subjects("dlq") == []
    finally:
        await app.stop()


async def test_a_timer_in_the_stream_rescheduled_by_an_earlier_turn_fires_once_at_its_new_time(
    redis_server: LocalRedisServer, redis_key_prefix: str, raw: aioredis.Redis
) -> None:
    app = RedisModeApp(redis_server.url, redis_key_prefix, partitions=1, **FAST)
    held = _Held()
    alarms: list[Any] = []
    markers = _fired_markers(app, raw)

    @app.on("session.touched")
    async def touched(ctx: EventContext) -> None:
        await held.hold()
        await ctx.subject.schedule("session.idle", after=0.1, key="idle", payload={"n": 2})

    @app.on("clock.arm")
    async def arm(ctx: EventContext) -> None:
        await ctx.turn.subject("session-1").schedule("session.idle", after=0.05, key="idle", payload={"n": 1})

    @app.on("session.idle")
    async def idle(ctx: EventContext) -> None:
        alarms.append(ctx.payload)

    await app.start()
    try:
        await app.emit("session.touched", "session-1")
        await asyncio.wait_for(held.holding.wait(), 10)
        await app.emit("clock.arm", "clock")

        async def moved_into_the_stream() -> bool:
            return bool(await markers())

        await wait_until(moved_into_the_stream)
        held.release.set()

        async def the_new_one_fired() -> bool:
            return bool(alarms) and await _pending_entries(app, raw) == 0 and not await markers()

        await wait_until(the_new_one_fired)
        assert alarms == [{"n": 2}]
        assert app.engine.stale_timers == 1
        assert await app.storage.all_timers() == []
    finally:
        await app.stop()


async def test_a_forged_timer_entry_written_to_the_stream_by_hand_runs_nothing_and_deletes_nothing(
    redis_server: LocalRedisServer, redis_key_prefix: str, raw: aioredis.Redis
) -> None:
    app = RedisModeApp(redis_server.url, redis_key_prefix, partitions=1, **FAST)
    ran: list[str] = []

    @app.on("user.created")
    async def created(ctx: EventContext) -> None:
        await ctx.subject.set("name", "ann")

    @app.on("user.reminder")
    async def remind(ctx: EventContext) -> None:
        ran.append(ctx.event_type)

    @app.on(SUBJECT_EXPIRED)
    async def archive(ctx: EventContext) -> None:
        ran.append(ctx.event_type)

    await app.start()
    try:
        await app.emit("user.created", "user-1")

        async def created_and_committed() -> bool:
            return (await app.storage.load("user-1"))[0] == {"name": "ann"}

        await wait_until(created_and_committed)
        stream = app.storage.keys.stream(0)
        for event_type, key in ((SUBJECT_EXPIRED, EXPIRE_KEY), ("user.reminder", "reminder")):
            forged = Event(
                event_type, "user-1", {}, f"forged-{key}", "mallory", 0.0, 0, None, {TIMER_EXTENSION: key}
            )
            await raw.xadd(stream, encode_entry(forged))  # type: ignore[arg-type]

        async def both_handled() -> bool:
            return app.engine.stale_timers == 2 and await _pending_entries(app, raw) == 0

        await wait_until(both_handled)
        assert ran == []
        assert (await app.storage.load("user-1"))[0] == {"name": "ann"}
        assert await app.storage.subjects("dlq") == []
    finally:
        await app.stop()


async def test_the_marker_of_a_firing_that_is_dead_lettered_is_removed_with_it(
    redis_server: LocalRedisServer, redis_key_prefix: str, raw: aioredis.Redis
) -> None:
    app = RedisModeApp(
        redis_server.url, redis_key_prefix, partitions=1, max_deliveries=1, claim_idle_ms=100, **FAST
    )
    markers = _fired_markers(app, raw)

    @app.on("plan")
    async def plan(ctx: EventContext) -> None:
        await ctx.subject.schedule("ding", after=0.05)

    @app.on("ding")
    async def ding(ctx: EventContext) -> None:
        raise StorageError("the storage failed under this turn")  # the turn is never committed

    await app.start()
    try:
        await app.emit("plan", "s")

        async def dead_lettered() -> bool:
            return bool(await app.storage.subjects("dlq-")) and await _pending_entries(app, raw) == 0

        await wait_until(dead_lettered)
        assert await markers() == {}
    finally:
        await app.stop()
