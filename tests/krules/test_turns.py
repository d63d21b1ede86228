"""Turns: which subjects they store, when they end, and how turns wait for each other."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from krules import emit, subject
from krules.config import Settings
from krules.context import EventContext
from krules.errors import TurnEndedError
from krules.event_types import SUBJECT_PROPERTY_CHANGED
from krules.testing import KRulesTestApp


async def test_an_event_for_a_subject_object_sees_the_turns_cached_subject(krules_app: KRulesTestApp) -> None:
    seen: list[object] = []

    @krules_app.on("a")
    async def first(ctx: EventContext) -> None:
        b = krules_app.engine.subject("b")
        await b.set("x", 1, muted=True)
        await ctx.emit("b.go", subject=krules_app.subject("b"))  # another object named "b"

    @krules_app.on("b.go")
    async def second(ctx: EventContext) -> None:
        seen.append(await ctx.subject.get("x", default=None))

    await krules_app.emit("a", "a")
    assert seen == [1]


async def test_a_shared_subject_written_in_a_handler_is_stored_when_the_turn_ends(
    krules_app: KRulesTestApp,
) -> None:
    config = krules_app.subject("config")  # e.g. a module-level subject("config") in a rule module
    await config.set("mode", "a", muted=True)

    @krules_app.on("bump")
    async def bump(ctx: EventContext) -> None:
        await config.set("hits", lambda n: (n or 0) + 1, muted=True)

    await krules_app.emit("bump", "x")
    await krules_app.emit("bump", "y")
    assert await krules_app.stored("config") == {"mode": "a", "hits": 2}


async def test_writes_after_the_turn_ended_are_refused_with_a_clear_error(krules_app: KRulesTestApp) -> None:
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    @krules_app.on("start")
    async def start(ctx: EventContext) -> None:
        async def later() -> None:
            await asyncio.sleep(0.01)
            try:
                await ctx.subject.set("late", 1, muted=True)
            except TurnEndedError as exc:
                outcome.set_result(exc)
            else:
                outcome.set_result(None)

        asyncio.get_running_loop().create_task(later())

    await krules_app.emit("start", "s")
    error = await asyncio.wait_for(outcome, 2)
    assert isinstance(error, TurnEndedError) and "after the turn" in str(error)


async def test_a_turn_waiting_for_a_slot_is_not_overtaken_by_newcomers() -> None:
    async with KRulesTestApp(settings=Settings(max_concurrent_turns=1)) as app:
        order: list[str] = []
        tasks: list[asyncio.Task[None]] = []
        gate = asyncio.Event()

        @app.on("work")
        async def work(ctx: EventContext) -> None:
            order.append(ctx.subject.name)
            i = ctx.payload.get("i")
            if i == 0:
                await gate.wait()
            await asyncio.sleep(0)
            if i is not None and i < 5:  # a new request arrives just as this turn ends
                tasks.append(
                    asyncio.create_task(
                        app.emit("work", f"c{i + 1}", {"i": i + 1}), context=contextvars.Context()
                    )
                )

        first = asyncio.create_task(app.emit("work", "c0", {"i": 0}))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(app.emit("work", "b"))
        await asyncio.sleep(0)
        gate.set()
        await first
        await waiting
        while tasks:
            await tasks.pop(0)
        assert order.index("b") == 1, order


async def test_one_handler_left_after_sync_filters_runs_inline(krules_app: KRulesTestApp) -> None:
    tasks: dict[str, object] = {}
    for prop in ("status", "total", "owner", "items"):

        async def on_change(ctx: EventContext, prop: str = prop) -> None:
            tasks[prop] = asyncio.current_task()

        on_change.__qualname__ = f"on_{prop}"
        krules_app.when(lambda ctx, prop=prop: ctx.property_name == prop)(
            krules_app.on(SUBJECT_PROPERTY_CHANGED)(on_change)
        )

    @krules_app.on("go")
    async def go(ctx: EventContext) -> None:
        tasks["go"] = asyncio.current_task()
        await ctx.subject.set("status", "paid")

    await krules_app.emit("go", "o1")
    assert set(tasks) == {"go", "status"}
    assert tasks["status"] is tasks["go"]


async def test_a_cascade_far_deeper_than_the_stack_ends_with_the_loop_guard() -> None:
    async with KRulesTestApp(settings=Settings(max_cascade_depth=2000)) as app:

        @app.middleware
        async def passthrough(ctx: EventContext, next: object) -> None:
            await next()  # type: ignore[operator]

        @app.on("ping")
        async def loop(ctx: EventContext) -> None:
            await ctx.emit("ping")

        await app.emit("ping", "s")
        assert [type(f.error).__name__ for f in app.recorder.failures] == ["CascadeDepthExceeded"]
        assert len(app.recorder.of_type("ping")) == 2001


async def test_the_module_level_api_in_a_test_reaches_the_isolated_app(krules_app: KRulesTestApp) -> None:
    @krules_app.on("ping")
    async def pong(ctx: EventContext) -> None:
        await subject("seen").set("by", ctx.subject.name, muted=True)

    await emit("ping", "module-level")
    assert await krules_app.stored("seen") == {"by": "module-level"}


@pytest.mark.parametrize(
    "name", ["id", "source", "time", "type", "specversion", "krulesdepth", "krulesreplaysig", "krulesother"]
)
async def test_core_attributes_cannot_be_overwritten_as_extensions(
    krules_app: KRulesTestApp, name: str
) -> None:
    from krules.errors import EventFormatError

    with pytest.raises(EventFormatError, match="cannot be an extension"):
        await krules_app.emit("x", "s", {}, **{name: "spoofed"})


async def test_a_root_payload_that_is_not_json_is_refused(krules_app: KRulesTestApp) -> None:
    from krules.errors import EventFormatError

    with pytest.raises(EventFormatError, match="not JSON-serialisable"):
        await krules_app.emit("x", "s", {"when": object()})
    assert krules_app.recorder.events == []


async def test_a_storage_failure_let_through_by_a_handler_stores_nothing_of_the_turn(
    krules_app: KRulesTestApp,
) -> None:
    from krules.errors import StorageUnavailableError

    @krules_app.on("work")
    async def writes_then_reads(ctx: EventContext) -> None:
        await ctx.subject.set("written", True)
        raise StorageUnavailableError("Redis at redis://x could not read subject 'a' after 9 attempts.")

    @krules_app.on("work")
    async def other_handler(ctx: EventContext) -> None:
        await subject("other").set("touched", True)

    event = krules_app.engine.new_event("work", "a", {})
    with pytest.raises(StorageUnavailableError):
        await krules_app.engine.process(event)
    assert await krules_app.stored("a") == {}  # not half a turn: it is to be taken again whole
    assert await krules_app.stored("other") == {}


async def test_a_value_that_cannot_be_stored_is_the_handlers_failure_not_the_turns(
    krules_app: KRulesTestApp,
) -> None:
    @krules_app.on("work")
    async def bad_value(ctx: EventContext) -> None:
        await ctx.subject.set("when", object())

    @krules_app.on("work")
    async def good(ctx: EventContext) -> None:
        await ctx.subject.set("fine", 1)

    turn = await krules_app.engine.process(krules_app.engine.new_event("work", "b", {}))
    assert [type(f.error).__name__ for f in turn.failures] == ["ValueNotSerializableError"]
    assert await krules_app.stored("b") == {"fine": 1}
