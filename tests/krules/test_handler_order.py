"""Handler order: concurrent by default, KRules' one-after-another with KRULES_HANDLER_ORDER=sequential."""

from __future__ import annotations

import asyncio

import pytest

from krules import KRulesContainer
from krules.config import Settings
from krules.context import EventContext
from krules.errors import ConfigurationError
from krules.testing import KRulesTestApp

SEQUENTIAL = Settings(handler_order="sequential")


def test_handlers_run_concurrently_unless_the_app_asks_for_krules_order() -> None:
    assert Settings().handler_order == "concurrent"
    assert Settings.from_env({"KRULES_HANDLER_ORDER": "Sequential"}).handler_order == "sequential"
    with pytest.raises(ConfigurationError, match="KRULES_HANDLER_ORDER='random' is not one of"):
        Settings.from_env({"KRULES_HANDLER_ORDER": "random"})


@pytest.mark.parametrize(("order", "second_saw"), [("concurrent", None), ("sequential", "validated")])
async def test_a_handler_reads_what_the_one_before_it_wrote_after_an_await_only_in_sequential_order(
    order: str, second_saw: str | None
) -> None:
    seen: list[str | None] = []
    async with KRulesTestApp(settings=Settings(handler_order=order)) as app:

        @app.on("order.submitted")
        async def validate(ctx: EventContext) -> None:
            await asyncio.sleep(0)  # any await: a lookup, a call to another service
            await ctx.subject.set("status", "validated")

        @app.on("order.submitted")
        async def charge(ctx: EventContext) -> None:
            seen.append(await ctx.subject.get("status", default=None))

        await app.emit("order.submitted", "order-1")

    assert seen == [second_saw]


async def test_in_sequential_order_a_failing_handler_does_not_stop_the_next() -> None:
    ran: list[str] = []
    async with KRulesTestApp(settings=SEQUENTIAL) as app:

        @app.on("x")
        async def first(ctx: EventContext) -> None:
            ran.append("first")

        @app.on("x")
        async def broken(ctx: EventContext) -> None:
            await asyncio.sleep(0)
            raise RuntimeError("boom")

        @app.on("x")
        async def last(ctx: EventContext) -> None:
            ran.append("last")

        await app.emit("x", "s")

    assert ran == ["first", "last"]
    [failure] = app.recorder.failures
    assert failure.handler.endswith("broken")
    assert isinstance(failure.error, RuntimeError)


async def test_in_sequential_order_the_cascade_of_one_handler_ends_before_the_next_starts() -> None:
    steps: list[str] = []
    async with KRulesTestApp(settings=SEQUENTIAL) as app:

        @app.on("x")
        async def first(ctx: EventContext) -> None:
            steps.append("first")
            await ctx.emit("y")

        @app.on("x")
        async def second(ctx: EventContext) -> None:
            steps.append("second")

        @app.on("y")
        async def child(ctx: EventContext) -> None:
            await asyncio.sleep(0)
            await ctx.subject.set("done", True)
            steps.append("child")

        await app.emit("x", "s")

    assert steps == ["first", "child", "second"]
    assert await app.stored("s") == {"done": True}


@pytest.mark.parametrize(("order", "ran"), [("concurrent", []), ("sequential", ["notify"])])
async def test_in_sequential_order_a_filter_is_applied_after_the_handler_before_it(
    order: str, ran: list[str]
) -> None:
    # Concurrent dispatch applies every sync filter before any handler starts; KRules applies each
    # rule's filters just before that rule runs, so they see what the rules before it did.
    state: dict[str, bool] = {}
    calls: list[str] = []
    async with KRulesTestApp(settings=Settings(handler_order=order)) as app:

        @app.on("x")
        async def prepare(ctx: EventContext) -> None:
            state["ready"] = True

        @app.on("x")
        @app.when(lambda ctx: state.get("ready", False))
        async def notify(ctx: EventContext) -> None:
            calls.append("notify")

        await app.emit("x", "s")

    assert calls == ran


async def test_a_ported_container_keeps_krules_order_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KRULES_HANDLER_ORDER", "sequential")
    container = KRulesContainer()
    on, _when, _middleware, emit = container.handlers()
    seen: list[int] = []

    @on("counter.tick")
    async def increment(ctx: EventContext) -> None:
        await asyncio.sleep(0)
        await ctx.subject.set("count", lambda n: (n or 0) + 1)

    @on("counter.tick")
    async def report(ctx: EventContext) -> None:
        seen.append(await ctx.subject.get("count"))

    await emit("counter.tick", "counter-1")
    await emit("counter.tick", "counter-1")
    await container.engine().close()

    assert seen == [1, 2]
