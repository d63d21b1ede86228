"""The dispatcher: concurrency, isolation, ordering, loop guard, middleware and auto-store."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest
from dependency_injector import providers

from krules import SkipEvent
from krules.config import Settings
from krules.context import EventContext
from krules.engine import Engine
from krules.errors import CascadeDepthExceeded, EventFormatError
from krules.event_types import SUBJECT_PROPERTY_CHANGED
from krules.testing import KRulesTestApp


async def test_handlers_of_one_event_run_concurrently(krules_app: KRulesTestApp) -> None:
    started: list[str] = []
    both_started = asyncio.Event()

    async def wait_for_the_other(name: str) -> None:
        started.append(name)
        if len(started) == 2:
            both_started.set()
        await asyncio.wait_for(both_started.wait(), 2)

    @krules_app.on("x")
    async def first(ctx: EventContext) -> None:
        await wait_for_the_other("first")

    @krules_app.on("x")
    async def second(ctx: EventContext) -> None:
        await wait_for_the_other("second")

    await krules_app.emit("x", "s")
    assert sorted(started) == ["first", "second"]
    assert krules_app.recorder.failures == []


async def test_a_single_matching_handler_runs_in_the_callers_task(krules_app: KRulesTestApp) -> None:
    tasks: list[asyncio.Task[Any] | None] = []

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        tasks.append(asyncio.current_task())

    await krules_app.emit("x", "s")
    assert tasks == [asyncio.current_task()]


async def test_a_failing_handler_does_not_stop_the_others(krules_app: KRulesTestApp) -> None:
    ran: list[str] = []

    @krules_app.on("user.action")
    async def broken(ctx: EventContext) -> None:
        raise RuntimeError("boom")

    @krules_app.on("user.action")
    async def healthy(ctx: EventContext) -> None:
        ran.append("healthy")
        await ctx.subject.set("seen", True)

    await krules_app.emit("user.action", "u1")
    assert ran == ["healthy"]
    assert [(f.handler.rsplit(".", 1)[-1], str(f.error)) for f in krules_app.recorder.failures] == [
        ("broken", "boom")
    ]
    assert await krules_app.stored("u1") == {"seen": True}


async def test_a_raising_filter_is_logged_and_isolated(
    krules_app: KRulesTestApp, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    @krules_app.on("x")
    @krules_app.when(lambda ctx: ctx.payload["missing"])
    async def filtered(ctx: EventContext) -> None:
        ran.append("filtered")

    @krules_app.on("x")
    async def other(ctx: EventContext) -> None:
        ran.append("other")

    await krules_app.emit("x", "s", {})
    assert ran == ["other"]
    assert len(krules_app.recorder.failures) == 1
    assert "filter of" in caplog.text and "KeyError" in caplog.text


async def test_stacked_sync_and_async_filters_must_all_pass(krules_app: KRulesTestApp) -> None:
    ran: list[int] = []

    async def is_active(ctx: EventContext) -> bool:
        return bool(await ctx.subject.get("active", default=False))

    @krules_app.on("feature.use")
    @krules_app.when(lambda ctx: ctx.payload["credits"] > 0)
    @krules_app.when(is_active)
    async def use(ctx: EventContext) -> None:
        ran.append(ctx.payload["credits"])

    await krules_app.emit("feature.use", "u", {"credits": 1})
    await krules_app.subject("u").set("active", True)
    await krules_app.emit("feature.use", "u", {"credits": 0})
    await krules_app.emit("feature.use", "u", {"credits": 2})
    assert ran == [2]


async def test_events_of_one_subject_are_processed_one_at_a_time_in_arrival_order(
    krules_app: KRulesTestApp,
) -> None:
    log: list[str] = []

    @krules_app.on("step")
    async def step(ctx: EventContext) -> None:
        log.append(f"start {ctx.subject.name} {ctx.payload['n']}")
        await asyncio.sleep(0.01 if ctx.payload["n"] == 0 else 0)
        log.append(f"end {ctx.subject.name} {ctx.payload['n']}")

    await asyncio.gather(*(krules_app.emit("step", "a", {"n": n}) for n in range(3)))
    assert log == ["start a 0", "end a 0", "start a 1", "end a 1", "start a 2", "end a 2"]


async def test_events_of_different_subjects_run_concurrently(krules_app: KRulesTestApp) -> None:
    inside = 0
    most = 0

    @krules_app.on("step")
    async def step(ctx: EventContext) -> None:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await asyncio.sleep(0.01)
        inside -= 1

    await asyncio.gather(*(krules_app.emit("step", f"s{n}") for n in range(5)))
    assert most == 5


async def test_concurrent_turns_are_bounded_by_the_setting() -> None:
    async with KRulesTestApp(settings=Settings(max_concurrent_turns=2)) as app:
        inside = 0
        most = 0

        @app.on("step")
        async def step(ctx: EventContext) -> None:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.005)
            inside -= 1

        await asyncio.gather(*(app.emit("step", f"s{n}") for n in range(6)))
        assert most == 2


async def test_a_cascade_deeper_than_the_limit_stops_with_a_clear_error(krules_app: KRulesTestApp) -> None:
    @krules_app.on("ping")
    async def ping(ctx: EventContext) -> None:
        await ctx.emit("ping")

    await krules_app.emit("ping", "loop")
    assert len(krules_app.recorder.of_type("ping")) == 33  # the root plus 32 levels
    (failure,) = krules_app.recorder.failures
    assert isinstance(failure.error, CascadeDepthExceeded)
    message = str(failure.error)
    assert "depth 32" in message and "ping(loop) -> ping(loop)" in message


async def test_the_cascade_depth_limit_is_configurable() -> None:
    async with KRulesTestApp(settings=Settings(max_cascade_depth=3)) as app:

        @app.on(SUBJECT_PROPERTY_CHANGED)
        async def bump(ctx: EventContext) -> None:
            await ctx.subject.set("n", lambda n: n + 1)

        await app.subject("c").set("n", 0)
        assert len(app.recorder.of_type(SUBJECT_PROPERTY_CHANGED)) == 4
        (failure,) = app.recorder.failures
        assert isinstance(failure.error, CascadeDepthExceeded)
        # the write that would have gone past the limit was refused before it was cached
        assert await app.stored("c") == {"n": 3}


async def test_cached_writes_of_every_subject_touched_by_a_turn_are_stored_when_it_ends(
    krules_app: KRulesTestApp,
) -> None:
    stored_during_turn: dict[str, Any] = {}

    @krules_app.on("order.paid")
    async def paid(ctx: EventContext) -> None:
        await ctx.subject.set("status", "paid")
        await krules_app.engine.subject("customer-1").set("orders", lambda n: (n or 0) + 1)
        stored_during_turn.update(await krules_app.stored(ctx.subject.name))

    await krules_app.emit("order.paid", "order-1")
    assert stored_during_turn == {}
    assert await krules_app.stored("order-1") == {"status": "paid"}
    assert await krules_app.stored("customer-1") == {"orders": 1}


async def test_the_same_subject_name_yields_the_same_cached_subject_within_an_event(
    krules_app: KRulesTestApp,
) -> None:
    seen: list[Any] = []

    @krules_app.on("x")
    async def first(ctx: EventContext) -> None:
        seen.append(ctx.subject)
        seen.append(krules_app.engine.subject("s"))
        await ctx.emit("y", subject="other")

    @krules_app.on("y")
    async def second(ctx: EventContext) -> None:
        seen.append(krules_app.engine.subject("s"))
        seen.append(ctx.subject)

    await krules_app.emit("x", "s")
    assert seen[0] is seen[1] is seen[2]
    assert seen[3].name == "other" and seen[3] is not seen[0]


async def test_child_event_ids_are_deterministic_from_the_parent(krules_app: KRulesTestApp) -> None:
    @krules_app.on("a")
    async def a(ctx: EventContext) -> None:
        await ctx.emit("b")
        await ctx.emit("c")

    @krules_app.on("b")
    async def b(ctx: EventContext) -> None:
        await ctx.emit("d")

    await krules_app.emit("a", "s")
    (root,) = krules_app.recorder.of_type("a")
    ids = {e.type: e.id for e in krules_app.recorder.events}
    key_a, key_b = (r.key for r in (krules_app.engine.registry.match(t)[0] for t in ("a", "b")))
    assert ids == {
        "a": root.id,
        "b": f"{root.id}.{key_a}-1",
        "d": f"{root.id}.{key_a}-1.{key_b}-1",
        "c": f"{root.id}.{key_a}-2",
    }


async def test_child_ids_do_not_depend_on_how_concurrent_handlers_interleave() -> None:
    async def run(slow: str) -> dict[str, str]:
        async with KRulesTestApp() as app:

            @app.on("tick")
            async def first(ctx: EventContext) -> None:
                if slow == "first":
                    await asyncio.sleep(0.001)
                await ctx.emit("from.first")

            @app.on("tick")
            async def second(ctx: EventContext) -> None:
                if slow == "second":
                    await asyncio.sleep(0.001)
                await ctx.emit("from.second")

            await app.engine.process(app.engine.new_event("tick", "s"))  # ids from the root "x-1"
            return {e.type: e.id.split(".", 1)[1] for e in app.recorder.events if e.depth}

    assert await run("first") == await run("second")


async def test_a_retried_handler_call_re_emits_the_same_child_ids(krules_app: KRulesTestApp) -> None:
    @krules_app.middleware
    async def retry_once(ctx: EventContext, next: Any) -> None:
        try:
            await next()
        except RuntimeError:
            await next()

    attempts: list[int] = []

    @krules_app.on("job")
    async def flaky(ctx: EventContext) -> None:
        attempts.append(1)
        await ctx.emit("job.step")
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails after emitting")

    await krules_app.emit("job", "s")
    first, second = (e.id for e in krules_app.recorder.of_type("job.step"))
    assert first == second


async def test_emit_rejects_a_payload_that_is_not_a_dict(krules_app: KRulesTestApp) -> None:
    with pytest.raises(EventFormatError, match="payload must be a dict"):
        await krules_app.emit("x", "s", [1, 2])  # type: ignore[arg-type]


async def test_extensions_are_visible_as_metadata(krules_app: KRulesTestApp) -> None:
    seen: list[Any] = []

    @krules_app.on("alert.critical")
    async def alert(ctx: EventContext) -> None:
        seen.append(ctx.get_metadata("topic"))
        seen.append(ctx.event.get_extension("topic"))

    await krules_app.emit("alert.critical", "device-1", {"temp": 95}, topic="alerts")
    assert seen == ["alerts", "alerts"]


async def test_emitted_events_keep_the_trace_context_but_no_other_extension_of_their_parent(
    krules_app: KRulesTestApp,
) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    @krules_app.middleware
    async def tenant(ctx: EventContext, next: Any) -> None:  # sets emit extensions of its own
        ctx.emit_extensions = {"tenant": "acme"}
        await next()

    @krules_app.on("a")
    async def emitter(ctx: EventContext) -> None:
        await ctx.emit("b")
        await ctx.emit("c", topic="x", traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")

    await krules_app.emit("a", "s", traceparent=traceparent, tracestate="k=v", topic="parent-only")

    (b,) = krules_app.recorder.of_type("b")
    (c,) = krules_app.recorder.of_type("c")
    assert b.extensions == {"tenant": "acme", "traceparent": traceparent, "tracestate": "k=v"}
    assert c.extensions == {
        "tenant": "acme",
        "topic": "x",
        "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
    }


async def test_middleware_wraps_each_handler_call_first_registered_outermost(
    krules_app: KRulesTestApp,
) -> None:
    calls: list[str] = []

    @krules_app.middleware
    async def outer(ctx: EventContext, next: Any) -> None:
        calls.append(f"outer>{ctx.handler_name.rsplit('.', 1)[-1]}")
        await next()
        calls.append("outer<")

    @krules_app.middleware
    async def inner(ctx: EventContext, next: Any) -> None:
        calls.append("inner>")
        await next()
        calls.append("inner<")

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        calls.append("handler")

    await krules_app.emit("x", "s")
    assert calls == ["outer>handler", "inner>", "handler", "inner<", "outer<"]


async def test_context_variables_set_by_middleware_are_visible_in_the_handler(
    krules_app: KRulesTestApp,
) -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")
    seen: list[str] = []

    @krules_app.middleware
    async def tag(ctx: EventContext, next: Any) -> None:
        request_id.set(ctx.handler_name.rsplit(".", 1)[-1])
        ctx.set_metadata("tagged", True)
        await next()

    @krules_app.on("x")
    async def one(ctx: EventContext) -> None:
        seen.append(f"{request_id.get()}:{ctx.get_metadata('tagged')}")

    @krules_app.on("x")
    async def two(ctx: EventContext) -> None:
        seen.append(f"{request_id.get()}:{ctx.get_metadata('tagged')}")

    await krules_app.emit("x", "s")
    assert sorted(seen) == ["one:True", "two:True"]


async def test_a_middleware_can_skip_a_handler_without_failing_it(krules_app: KRulesTestApp) -> None:
    ran: list[str] = []

    @krules_app.middleware
    async def only_vip(ctx: EventContext, next: Any) -> None:
        if not ctx.payload.get("vip"):
            raise SkipEvent()
        await next()

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        ran.append(ctx.payload.get("who", "?"))

    await krules_app.emit("x", "s", {"who": "a"})
    await krules_app.emit("x", "s", {"who": "b", "vip": True})
    assert ran == ["b"]
    assert krules_app.recorder.failures == []


async def test_settle_waits_for_turns_started_elsewhere(krules_app: KRulesTestApp) -> None:
    done: list[int] = []

    @krules_app.on("slow")
    async def slow(ctx: EventContext) -> None:
        await asyncio.sleep(0.01)
        done.append(1)

    task = asyncio.ensure_future(krules_app.emit("slow", "s"))
    await asyncio.sleep(0)
    await krules_app.settle()
    assert done == [1]
    await task


async def test_the_dead_letter_extension_is_reserved_for_replays(krules_app: KRulesTestApp) -> None:
    with pytest.raises(EventFormatError, match="krulesdlq"):
        await krules_app.engine.emit("x", "s", {}, krulesdlq="dlq-1")


# -- emit's keyword arguments: KRules' event metadata ----------------------------------------------
async def test_emit_keywords_are_metadata_a_middleware_reads_as_krules_documents(
    krules_app: KRulesTestApp,
) -> None:
    routed: list[tuple[Any, Any, Any]] = []

    @krules_app.middleware
    async def route(ctx: EventContext, next: Any) -> None:
        if ctx.event_type == "order.shipped":
            routed.append(
                (ctx.get_metadata("topic"), ctx.get_metadata("dispatch_url"), ctx.get_metadata("priority"))
            )
        await next()

    @krules_app.on("order.placed")
    async def ship(ctx: EventContext) -> None:
        await ctx.emit(
            "order.shipped", topic="orders", dispatch_url="https://hooks.example/ship", priority=1.5
        )

    @krules_app.on("order.shipped")
    async def shipped(ctx: EventContext) -> None:
        pass

    await krules_app.emit("order.placed", "order-1", {}, dispatch_url="https://hooks.example/place")
    await krules_app.emit(
        "order.shipped", "order-2", {}, topic="direct", dispatch_url="https://hooks.example/x"
    )

    assert routed == [
        ("orders", "https://hooks.example/ship", 1.5),  # a handler's emit
        ("direct", "https://hooks.example/x", None),  # a root emit
    ]


async def test_only_keywords_that_are_valid_cloudevents_extensions_travel_with_the_event(
    krules_app: KRulesTestApp,
) -> None:
    @krules_app.on("alert")
    async def alert(ctx: EventContext) -> None:
        pass

    await krules_app.emit(
        "alert", "device-1", {}, topic="alerts", retries=3, dispatch_url="https://x", level=2.5, Topic="x"
    )

    (event,) = krules_app.recorder.of_type("alert")
    assert event.extensions == {"topic": "alerts", "retries": 3}
    assert event.local_metadata == {"dispatch_url": "https://x", "level": 2.5, "Topic": "x"}
    cloudevent = event.to_cloudevent()
    assert cloudevent.get_extension("topic") == "alerts"
    assert "dispatch_url" not in cloudevent.get_attributes()


async def test_emit_extra_becomes_ctx_extra_of_the_emitted_event_s_handlers(
    krules_app: KRulesTestApp,
) -> None:
    seen: list[Any] = []

    @krules_app.on("alert.critical")
    async def alert(ctx: EventContext) -> None:
        seen.append((ctx.extra, ctx.get_metadata("extra")))
        await ctx.emit("alert.logged", extra={"from": "alert"})

    @krules_app.on("alert.logged")
    async def logged(ctx: EventContext) -> None:
        seen.append((ctx.extra, ctx.get_metadata("reason")))

    await krules_app.emit("alert.critical", "device-1", {}, extra={"reason": "high_temp"})

    assert seen == [({"reason": "high_temp"}, None), ({"from": "alert"}, None)]


async def test_dataschema_is_local_metadata_and_not_an_attribute_of_the_event(
    krules_app: KRulesTestApp,
) -> None:
    seen: list[Any] = []

    @krules_app.on("reading")
    async def reading(ctx: EventContext) -> None:
        seen.append(ctx.get_metadata("dataschema"))
        seen.append(ctx.event.get_dataschema())

    await krules_app.emit("reading", "sensor-1", {"v": 1}, dataschema="https://schemas.example/reading")

    assert seen == ["https://schemas.example/reading", None]


async def test_emit_metadata_belongs_to_the_emitted_event_only_not_to_what_its_handlers_emit(
    krules_app: KRulesTestApp,
) -> None:
    seen: list[Any] = []

    @krules_app.on("a")
    async def first(ctx: EventContext) -> None:
        await ctx.emit("b")

    @krules_app.on("b")
    async def second(ctx: EventContext) -> None:
        seen.append((ctx.get_metadata("dispatch_url"), ctx.extra))

    await krules_app.emit("a", "s", {}, dispatch_url="https://x", extra={"k": 1})

    assert seen == [(None, None)]


@pytest.mark.parametrize(
    "name", ["id", "source", "type", "time", "specversion", "data", "krulesdepth", "KrulesDepth"]
)
async def test_a_keyword_never_overrides_a_core_attribute_or_a_krules_extension(
    krules_app: KRulesTestApp, name: str
) -> None:
    @krules_app.on("x")
    async def emits(ctx: EventContext) -> None:
        await ctx.emit("y", **{name: "spoofed"})

    with pytest.raises(EventFormatError, match="cannot be an extension"):
        await krules_app.emit("x", "s", {}, **{name: "spoofed"})
    await krules_app.emit(
        "x", "s2"
    )  # the same refusal inside a handler: the handler fails, nothing is emitted
    assert krules_app.recorder.of_type("y") == []
    assert [f.error for f in krules_app.recorder.failures][-1].__class__ is EventFormatError


async def test_an_extra_that_is_not_a_dict_is_one_sentence(krules_app: KRulesTestApp) -> None:
    with pytest.raises(EventFormatError) as info:
        await krules_app.emit("x", "s", {}, extra="why")
    assert str(info.value) == "extra= of emit must be a dict (its handlers read it as ctx.extra), not 'why'."


async def test_metadata_that_cannot_travel_is_refused_when_the_event_goes_to_a_partition_stream() -> None:
    from krules import KRulesContainer
    from krules.transport.memory import MemoryStreams
    from storage.memory import MemoryStorage

    container = KRulesContainer()
    container.subject_storage.override(providers.Object(MemoryStorage()))
    engine: Engine = container.engine()
    streams = MemoryStreams(engine.storage)
    engine.transport = streams

    with pytest.raises(EventFormatError) as info:
        await engine.emit("order.placed", "order-1", {}, topic="orders", dispatch_url="https://x")
    assert str(info.value).startswith(
        "Event 'order.placed' goes through a partition stream, which carries CloudEvents extensions only, "
        "so dispatch_url= would not reach its handlers;"
    )
    await engine.emit("order.placed", "order-1", {}, topic="orders")  # extensions travel
    (delivery,) = await streams.read(10, 0)
    assert delivery.event.extensions == {"topic": "orders"}
