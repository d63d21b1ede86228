"""Timers and expiry in embedded mode: scheduled with the turn, fired as events, moved by the test clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from krules.changes import SubjectChanges
from krules.context import EventContext
from krules.errors import StorageUnavailableError, TimerError
from krules.events import Event
from krules.testing import KRulesTestApp
from krules.timers import EXPIRE_KEY, SUBJECT_EXPIRED, TIMER_EXTENSION
from storage.memory import MemoryStorage


async def test_a_thirty_minute_timeout_fires_once_when_the_test_clock_passes_it(
    krules_app: KRulesTestApp,
) -> None:
    fired: list[tuple[str, Any, str | None, float]] = []

    @krules_app.on("order.placed")
    async def placed(ctx: EventContext) -> None:
        await ctx.subject.set("status", "placed")
        await ctx.subject.schedule("order.payment_timeout", after=1800, payload={"n": 1}, key="payment")

    @krules_app.on("order.payment_timeout")
    async def timeout(ctx: EventContext) -> None:
        fired.append((ctx.subject.name, ctx.payload, ctx.timer_key, ctx.clock.now()))
        await ctx.subject.set("status", "cancelled")

    start = krules_app.clock.now()
    await krules_app.emit("order.placed", "order-1")
    assert await krules_app.advance(1799) == 0
    assert fired == []
    assert await krules_app.advance(1) == 1
    assert fired == [("order-1", {"n": 1}, "payment", start + 1800)]
    assert (await krules_app.stored("order-1"))["status"] == "cancelled"
    assert await krules_app.advance(3600) == 0


async def test_scheduling_the_same_key_again_replaces_the_timer(krules_app: KRulesTestApp) -> None:
    @krules_app.on("touch")
    async def touch(ctx: EventContext) -> None:
        await ctx.subject.schedule("idle", after=60, key="idle", payload={"at": ctx.clock.now()})

    fired: list[Any] = []

    @krules_app.on("idle")
    async def idle(ctx: EventContext) -> None:
        fired.append(ctx.payload["at"])

    start = krules_app.clock.now()
    await krules_app.emit("touch", "session")
    await krules_app.advance(50)
    await krules_app.emit("touch", "session")
    await krules_app.advance(50)
    assert fired == []
    await krules_app.advance(10)
    assert fired == [start + 50]


async def test_a_cancel_in_the_same_turn_as_the_schedule_leaves_nothing(krules_app: KRulesTestApp) -> None:
    @krules_app.on("go")
    async def go(ctx: EventContext) -> None:
        await ctx.subject.schedule("later", after=5, key="k")
        await ctx.subject.cancel_schedule("k")
        assert await ctx.subject.schedules() == []

    await krules_app.emit("go", "s")
    assert await krules_app.advance(10) == 0
    assert await krules_app.storage.timers("s") == []  # type: ignore[attr-defined]


async def test_a_timer_cancelled_by_a_later_turn_never_fires(krules_app: KRulesTestApp) -> None:
    @krules_app.on("order.placed")
    async def placed(ctx: EventContext) -> None:
        await ctx.subject.schedule("order.payment_timeout", after=1800, key="payment")

    @krules_app.on("order.paid")
    async def paid(ctx: EventContext) -> None:
        await ctx.subject.cancel_schedule("payment")

    await krules_app.emit("order.placed", "o")
    await krules_app.emit("order.paid", "o")
    assert await krules_app.advance(7200) == 0
    assert "order.payment_timeout" not in krules_app.recorder.types()


async def test_schedules_lists_what_is_pending_by_due_time(krules_app: KRulesTestApp) -> None:
    seen: list[Any] = []

    @krules_app.on("plan")
    async def plan(ctx: EventContext) -> None:
        await ctx.subject.schedule("b", after=20, key="b")
        await ctx.subject.schedule(
            "a", at=datetime.fromtimestamp(ctx.clock.now(), UTC) + timedelta(seconds=10)
        )

    @krules_app.on("look")
    async def look(ctx: EventContext) -> None:
        seen.extend((t["key"], t["type"], t["due"] - ctx.clock.now()) for t in await ctx.subject.schedules())

    await krules_app.emit("plan", "s")
    await krules_app.emit("look", "s")
    assert seen == [("a", "a", 10), ("b", "b", 20)]


class _FailingStorage(MemoryStorage):
    """Memory storage whose next store fails, as a storage that cannot be reached."""

    failing = False

    async def store(self, batch: Sequence[SubjectChanges]) -> None:
        if self.failing:
            self.failing = False
            raise StorageUnavailableError("the storage is away")
        await super().store(batch)


async def test_a_turn_that_is_not_stored_schedules_nothing() -> None:
    storage = _FailingStorage()
    async with KRulesTestApp(storage=storage) as app:

        @app.on("go")
        async def go(ctx: EventContext) -> None:
            await ctx.subject.schedule("later", after=1, key="k")

        storage.failing = True
        with pytest.raises(StorageUnavailableError):
            await app.emit("go", "s")
        assert await app.advance(10) == 0
        await app.emit("go", "s")
        assert await app.advance(10) == 1


async def test_timers_of_one_subject_fire_in_due_order(krules_app: KRulesTestApp) -> None:
    @krules_app.on("plan")
    async def plan(ctx: EventContext) -> None:
        for i in (3, 1, 2):
            await ctx.subject.schedule("tick", after=i, key=f"k{i}", payload={"i": i})

    order: list[int] = []

    @krules_app.on("tick")
    async def tick(ctx: EventContext) -> None:
        order.append(ctx.payload["i"])

    await krules_app.emit("plan", "s")
    assert await krules_app.advance(5) == 3
    assert order == [1, 2, 3]


async def test_a_firing_handler_can_schedule_the_next_one(krules_app: KRulesTestApp) -> None:
    @krules_app.on("beat")
    async def beat(ctx: EventContext) -> None:
        await ctx.subject.set("beats", lambda n: (n or 0) + 1)
        await ctx.subject.schedule("beat", after=60)

    await krules_app.emit("beat", "heart")
    assert await krules_app.advance(600) == 10
    assert (await krules_app.stored("heart"))["beats"] == 11


async def test_an_expired_subject_is_announced_with_its_last_properties_then_deleted(
    krules_app: KRulesTestApp,
) -> None:
    announced: list[Any] = []

    @krules_app.on("login")
    async def login(ctx: EventContext) -> None:
        await ctx.subject.set("user", "ann")
        await ctx.subject.set_ext("agent", "x")
        await ctx.subject.expire(after=86400)

    @krules_app.on(SUBJECT_EXPIRED)
    async def archive(ctx: EventContext) -> None:
        announced.append((ctx.subject.name, ctx.payload))

    await krules_app.emit("login", "session-1")
    await krules_app.advance(86399)
    assert await krules_app.stored("session-1") == {"user": "ann"}
    await krules_app.advance(1)
    assert announced == [("session-1", {"props": {"user": "ann"}, "ext_props": {"agent": "x"}})]
    assert await krules_app.storage.load("session-1") == ({}, {})


async def test_expire_again_resets_it_and_expire_none_clears_it(krules_app: KRulesTestApp) -> None:
    @krules_app.on("touch")
    async def touch(ctx: EventContext) -> None:
        await ctx.subject.set("n", lambda n: (n or 0) + 1)
        await ctx.subject.expire(after=ctx.payload["ttl"])

    await krules_app.emit("touch", "s", {"ttl": 100})
    await krules_app.advance(90)
    await krules_app.emit("touch", "s", {"ttl": 100})
    await krules_app.advance(90)
    assert (await krules_app.stored("s"))["n"] == 2
    await krules_app.emit("touch", "s", {"ttl": None})
    await krules_app.advance(1000)
    assert (await krules_app.stored("s"))["n"] == 3
    assert SUBJECT_EXPIRED not in krules_app.recorder.types()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"after": -1}, "must not be negative"),
        ({"after": "10"}, "finite number"),
        ({"after": float("nan")}, "finite number"),
        ({"after": True}, "finite number"),
        ({"at": datetime(2030, 1, 1)}, "no time zone"),
        ({"after": 1, "at": datetime(2030, 1, 1, tzinfo=UTC)}, "exactly one"),
        ({}, "exactly one"),
        ({"after": 1, "payload": {"x": {1, 2}}}, "JSON"),
        ({"after": 1, "payload": [1]}, "must be a dict"),
        ({"after": 1, "key": ""}, "non-empty string"),
        ({"after": 1, "key": "k" * 201}, "at most 200"),
        ({"after": 1, "key": "krules.expire"}, "reserved"),
    ],
)
async def test_bad_timer_input_is_one_clear_error_at_the_call_and_schedules_nothing(
    krules_app: KRulesTestApp, kwargs: dict[str, Any], message: str
) -> None:
    errors: list[TimerError] = []

    @krules_app.on("go")
    async def go(ctx: EventContext) -> None:
        try:
            await ctx.subject.schedule("later", **kwargs)
        except TimerError as exc:
            errors.append(exc)

    await krules_app.emit("go", "s")
    assert len(errors) == 1
    assert message in str(errors[0])
    assert await krules_app.storage.timers("s") == []  # type: ignore[attr-defined]


async def test_scheduling_outside_a_handler_is_refused(krules_app: KRulesTestApp) -> None:
    with pytest.raises(TimerError, match="only be scheduled by a handler"):
        await krules_app.subject("s").schedule("later", after=1)


async def test_an_expiry_set_again_after_the_old_one_came_due_keeps_the_subject(
    krules_app: KRulesTestApp,
) -> None:
    @krules_app.on("touch")
    async def touch(ctx: EventContext) -> None:
        await ctx.subject.set("n", lambda n: (n or 0) + 1)
        await ctx.subject.expire(after=100)

    storage: Any = krules_app.storage
    await krules_app.emit("touch", "s")
    krules_app.clock.advance(100)
    [due] = await storage.take_due_timers(krules_app.clock.now())  # on its way, as in a stream
    await krules_app.emit("touch", "s")  # a turn in between sets the expiry again
    await krules_app.engine.process(due.event)

    assert await krules_app.stored("s") == {"n": 2}
    assert SUBJECT_EXPIRED not in krules_app.recorder.types()
    assert await krules_app.advance(100) == 1
    assert await krules_app.storage.load("s") == ({}, {})


async def test_a_store_in_the_handler_leaves_the_timers_to_the_turns_commit() -> None:
    storage = _FailingStorage()
    async with KRulesTestApp(storage=storage) as app:

        @app.on("go")
        async def go(ctx: EventContext) -> None:
            await ctx.subject.set("a", 1)
            await ctx.subject.schedule("later", after=1)
            await ctx.subject.store()  # writes "a" now, not the timer
            assert await storage.timers("s") == []
            storage.failing = True  # the turn's own commit fails

        with pytest.raises(StorageUnavailableError):
            await app.emit("go", "s")
        assert await app.stored("s") == {"a": 1}
        assert await app.advance(10) == 0


async def test_a_timer_that_came_due_while_its_subject_was_busy_runs_nothing_once_that_turn_cancels_it(
    krules_app: KRulesTestApp,
) -> None:
    holding, release = asyncio.Event(), asyncio.Event()
    timeouts: list[Any] = []

    @krules_app.on("order.placed")
    async def placed(ctx: EventContext) -> None:
        await ctx.subject.schedule("order.payment_timeout", after=1800, key="payment")

    @krules_app.on("order.paid")
    async def paid(ctx: EventContext) -> None:
        holding.set()
        await release.wait()
        await ctx.subject.cancel_schedule("payment")

    @krules_app.on("order.payment_timeout")
    async def timeout(ctx: EventContext) -> None:
        timeouts.append(ctx.subject.name)

    await krules_app.emit("order.placed", "order-1")
    paying = asyncio.ensure_future(krules_app.emit("order.paid", "order-1"))
    await holding.wait()  # the payment's turn holds the order's lane
    krules_app.clock.advance(1800)
    firing = asyncio.ensure_future(krules_app.engine.fire_due_timers())  # due: waits for the lane
    await asyncio.sleep(0)
    release.set()
    await paying
    assert await firing == 1
    assert timeouts == []
    assert krules_app.engine.stale_timers == 1


async def test_a_timer_on_its_way_that_is_scheduled_again_fires_once_at_its_new_time(
    krules_app: KRulesTestApp,
) -> None:
    @krules_app.on("touch")
    async def touch(ctx: EventContext) -> None:
        await ctx.subject.schedule("idle", after=60, key="idle", payload={"at": ctx.clock.now()})

    fired: list[Any] = []

    @krules_app.on("idle")
    async def idle(ctx: EventContext) -> None:
        fired.append(ctx.payload["at"])

    storage: Any = krules_app.storage
    start = krules_app.clock.now()
    await krules_app.emit("touch", "session")
    krules_app.clock.advance(60)
    [due] = await storage.take_due_timers(krules_app.clock.now())  # on its way
    await krules_app.emit("touch", "session")  # a turn in between schedules the key again
    await krules_app.engine.process(due.event)
    assert fired == []
    assert await krules_app.advance(60) == 1
    assert fired == [start + 60]


async def test_an_event_carrying_krulestimer_that_no_timer_fired_runs_nothing_and_deletes_nothing(
    krules_app: KRulesTestApp,
) -> None:
    ran: list[str] = []

    @krules_app.on("user.created")
    async def created(ctx: EventContext) -> None:
        await ctx.subject.set("name", "ann")

    @krules_app.on("user.reminder")
    async def remind(ctx: EventContext) -> None:
        ran.append(ctx.event_type)

    await krules_app.emit("user.created", "user-1")
    for event_type, key in ((SUBJECT_EXPIRED, EXPIRE_KEY), ("user.reminder", "reminder")):
        forged = Event(
            event_type, "user-1", {}, f"forged-{key}", "test", 0.0, 0, None, {TIMER_EXTENSION: key}
        )
        await krules_app.engine.process(forged)
    assert ran == []
    assert await krules_app.stored("user-1") == {"name": "ann"}
    assert krules_app.engine.stale_timers == 2


async def test_a_firing_is_forgotten_once_its_turn_is_over_even_when_the_turn_fails() -> None:
    storage = _FailingStorage()
    async with KRulesTestApp(storage=storage) as app:

        @app.on("plan")
        async def plan(ctx: EventContext) -> None:
            await ctx.subject.schedule("ding", after=1, key="a")
            await ctx.subject.schedule("ding", after=2, key="b")

        @app.on("ding")
        async def ding(ctx: EventContext) -> None:
            await ctx.subject.set("n", lambda n: (n or 0) + 1)
            storage.failing = ctx.timer_key == "b"  # the second firing's turn is not stored

        await app.emit("plan", "s")
        assert await app.advance(5) == 2
        assert await app.stored("s") == {"n": 1}
        assert storage._fired == {}
