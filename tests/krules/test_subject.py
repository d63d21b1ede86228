"""Subjects: cached and direct writes, events on change, extended properties, no lost updates."""

from __future__ import annotations

import asyncio
import functools
import operator
from collections.abc import Callable
from typing import Any

import pytest

from krules.context import EventContext
from krules.errors import ValueNotSerializableError
from krules.event_types import SUBJECT_DELETED, SUBJECT_PROPERTY_CHANGED, SUBJECT_PROPERTY_DELETED
from krules.testing import KRulesTestApp


async def test_a_missing_property_raises_attribute_error_unless_a_default_is_given(
    krules_app: KRulesTestApp,
) -> None:
    s = krules_app.subject("s")
    with pytest.raises(AttributeError, match="'s' has no property 'x'"):
        await s.get("x")
    assert await s.get("x", default=None) is None
    assert await s.get("x", default=3) == 3
    with pytest.raises(AttributeError):
        await s.get("x", use_cache=False)


async def test_set_returns_new_and_old_and_fires_only_when_the_value_changed(
    krules_app: KRulesTestApp,
) -> None:
    changes: list[tuple[Any, Any, Any]] = []

    @krules_app.on(SUBJECT_PROPERTY_CHANGED)
    async def changed(ctx: EventContext) -> None:
        changes.append((ctx.property_name, ctx.old_value, ctx.new_value))

    s = krules_app.subject("s")
    assert await s.set("status", "new") == ("new", None)
    assert await s.set("status", "new") == ("new", "new")
    assert await s.set("status", "paid") == ("paid", "new")
    assert changes == [("status", None, "new"), ("status", "new", "paid")]


async def test_muted_writes_and_extended_properties_never_fire(krules_app: KRulesTestApp) -> None:
    s = krules_app.subject("s")
    await s.set("count", 1, muted=True)
    await s.set_ext("internal", lambda n: (n or 0) + 1)
    await s.set_ext("internal", lambda n: (n or 0) + 1)
    assert krules_app.recorder.events == []
    assert await s.get_ext("internal") == 2
    await s.store()
    props, ext = await krules_app.storage.load("s")
    assert props == {"count": 1} and ext == {"internal": 2}


async def test_handlers_see_the_change_before_set_returns_and_get_the_extra(
    krules_app: KRulesTestApp,
) -> None:
    seen: list[Any] = []

    @krules_app.on(SUBJECT_PROPERTY_CHANGED)
    async def changed(ctx: EventContext) -> None:
        seen.append((await ctx.subject.get("temperature"), ctx.extra))

    s = krules_app.subject("sensor")
    await s.set("temperature", 81, extra={"reason": "reading"})
    assert seen == [(81, {"reason": "reading"})]


async def test_callable_updates_receive_none_for_a_missing_property(krules_app: KRulesTestApp) -> None:
    s = krules_app.subject("s")
    assert await s.set("n", lambda n: (n or 0) + 1) == (1, None)
    assert await s.set("n", lambda n: n * 10) == (10, 1)


async def test_cached_writes_are_stored_only_on_store_outside_a_turn(krules_app: KRulesTestApp) -> None:
    s = krules_app.subject("user-1")
    await s.set("name", "Ada", muted=True)
    await s.set("email", "ada@example.com", muted=True)
    assert await krules_app.stored("user-1") == {}
    await s.store()
    assert await krules_app.stored("user-1") == {"name": "Ada", "email": "ada@example.com"}


async def test_use_cache_false_writes_go_to_storage_at_once(krules_app: KRulesTestApp) -> None:
    s = krules_app.subject("sensor")
    await s.set("last_reading", 21.5, use_cache=False, muted=True)
    assert await krules_app.stored("sensor") == {"last_reading": 21.5}
    assert await s.set("count", lambda n: (n or 0) + 1, use_cache=False, muted=True) == (1, None)
    assert await s.get("count", use_cache=False) == 1
    await s.delete("last_reading", use_cache=False, muted=True)
    assert await krules_app.stored("sensor") == {"count": 1}


async def test_a_direct_write_supersedes_a_pending_cached_write_of_the_same_property(
    krules_app: KRulesTestApp,
) -> None:
    s = krules_app.subject("s")
    await s.set("x", "cached", muted=True)
    await s.set("x", "direct", muted=True, use_cache=False)
    await s.store()
    assert await krules_app.stored("s") == {"x": "direct"}
    assert await s.get("x") == "direct"


async def test_delete_fires_property_deleted_and_missing_raises(krules_app: KRulesTestApp) -> None:
    s = krules_app.subject("s")
    await s.set("a", 1, muted=True)
    await s.delete("a")
    with pytest.raises(AttributeError):
        await s.delete("a")
    (event,) = krules_app.recorder.of_type(SUBJECT_PROPERTY_DELETED)
    assert event.data == {"property_name": "a", "old_value": 1}
    await s.store()
    assert await krules_app.stored("s") == {}


async def test_has_keys_and_dict_describe_the_subject(krules_app: KRulesTestApp) -> None:
    s = krules_app.subject("s")
    await s.set("a", 1, muted=True)
    await s.set_ext("tenant", "acme")
    assert await s.has("a") and not await s.has("b")
    assert await s.has_ext("tenant")  # cached, not stored yet
    assert not await s.has_ext("tenant", use_cache=False)
    assert await s.keys() == ["a"]
    assert await s.dict() == {"name": "s", "a": 1, "ext": {"tenant": "acme"}}
    await s.store()
    assert await s.dict(use_cache=False) == {"name": "s", "a": 1, "ext": {"tenant": "acme"}}
    assert await s.get_ext_props() == {"tenant": "acme"}


async def test_flush_deletes_the_subject_and_reports_what_it_held(krules_app: KRulesTestApp) -> None:
    s = krules_app.subject("s")
    await s.set("a", 1, muted=True)
    await s.set_ext("e", 2)
    await s.store()
    krules_app.recorder.clear()
    await s.flush()
    assert krules_app.recorder.types() == [SUBJECT_PROPERTY_DELETED, SUBJECT_DELETED]
    assert krules_app.recorder.of_type(SUBJECT_DELETED)[0].data == {"props": {"a": 1}, "ext_props": {"e": 2}}
    assert await krules_app.storage.subjects() == []


async def test_values_that_are_not_json_are_refused_and_nothing_is_cached(krules_app: KRulesTestApp) -> None:
    s = krules_app.subject("s")
    await s.set("ok", [1, 2], muted=True)
    with pytest.raises(ValueNotSerializableError, match=r"Property 'bad' of subject 's'.*set"):
        await s.set("bad", {1, 2})
    with pytest.raises(ValueNotSerializableError):
        await s.set("nan", float("nan"))
    with pytest.raises(ValueNotSerializableError):
        await s.set("bad", {1, 2}, use_cache=False)
    assert not await s.has("bad")
    assert krules_app.recorder.events == []
    await s.store()
    assert await krules_app.stored("s") == {"ok": [1, 2]}


async def test_a_callable_update_is_never_lost_to_a_concurrent_writer(krules_app: KRulesTestApp) -> None:
    first, second = krules_app.subject("counter"), krules_app.subject("counter")
    await first.set("n", lambda n: (n or 0) + 1, muted=True)
    await second.set("n", lambda n: (n or 0) + 1, muted=True)
    await first.store()
    await second.store()  # saw n missing, but another writer stored 1: re-applied on the stored value
    assert await krules_app.stored("counter") == {"n": 2}
    assert await second.get("n") == 2


async def test_composed_callable_updates_in_one_turn_are_reapplied_together(
    krules_app: KRulesTestApp,
) -> None:
    mine, theirs = krules_app.subject("c"), krules_app.subject("c")
    await mine.set("n", lambda n: (n or 0) + 1, muted=True)
    await mine.set("n", lambda n: n * 10, muted=True)
    await theirs.set("n", 5, muted=True)
    await theirs.store()
    await mine.store()
    assert await krules_app.stored("c") == {"n": 60}


async def test_many_concurrent_turns_incrementing_one_property_lose_nothing(
    krules_app: KRulesTestApp,
) -> None:
    @krules_app.on("hit")
    async def hit(ctx: EventContext) -> None:
        counter = krules_app.engine.subject("counter")
        await counter.set("hits", lambda n: (n or 0) + 1, muted=True)
        await asyncio.sleep(0)  # let other turns interleave between the cached write and the store

    await asyncio.gather(*(krules_app.emit("hit", f"page-{i}") for i in range(200)))
    assert await krules_app.stored("counter") == {"hits": 200}


async def test_values_come_back_as_json_would_return_them(krules_app: KRulesTestApp) -> None:
    s = krules_app.subject("s")
    await s.set("t", (1, 2), muted=True)
    await s.set("unicode", "żółw 🐢", muted=True)
    await s.store()
    fresh = krules_app.subject("s")
    assert await fresh.get("t") == [1, 2]
    assert await fresh.get("unicode") == "żółw 🐢"


async def test_a_cached_write_followed_by_a_direct_callable_update_keeps_both(
    krules_app: KRulesTestApp,
) -> None:
    def inc(n: Any) -> int:
        return (n or 0) + 1

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        await ctx.subject.set("n", inc, muted=True)
        await ctx.subject.set("n", inc, muted=True, use_cache=False)
        await ctx.subject.set_ext("e", inc)
        await ctx.subject.set_ext("e", inc, use_cache=False)

    await krules_app.emit("x", "s")
    assert await krules_app.storage.load("s") == ({"n": 2}, {"e": 2})


async def test_changes_json_sees_are_changes_even_when_python_says_equal(krules_app: KRulesTestApp) -> None:
    s = krules_app.subject("s")
    await s.set("flag", 1)
    await s.set("flag", True)  # 1 == True in Python, not in JSON
    await s.set("ratio", 1, use_cache=False)
    await s.set("ratio", 1.0, use_cache=False)
    await s.set("list", [1])
    await s.set("list", [True])
    values = [e.data["value"] for e in krules_app.recorder.of_type(SUBJECT_PROPERTY_CHANGED)]
    assert values == [1, True, 1, 1.0, [1], [True]]


async def test_a_list_changed_in_place_and_set_again_fires(krules_app: KRulesTestApp) -> None:
    @krules_app.on("add")
    async def add(ctx: EventContext) -> None:
        items = await ctx.subject.get("items", default=[])
        items.append(ctx.payload["item"])
        await ctx.subject.set("items", items)

    await krules_app.emit("add", "cart", {"item": "a"})
    await krules_app.emit("add", "cart", {"item": "b"})
    assert await krules_app.stored("cart") == {"items": ["a", "b"]}
    assert [e.data["value"] for e in krules_app.recorder.of_type(SUBJECT_PROPERTY_CHANGED)] == [
        ["a"],
        ["a", "b"],
    ]


# -- callables of no argument (as in KRules) ----------------------------------------------------


def token_maker() -> tuple[Callable[[], str], list[str]]:
    """A function of no argument that makes a new token at each call, and the tokens it made."""
    made: list[str] = []

    def new_token() -> str:
        made.append(f"token-{len(made) + 1}")
        return made[-1]

    return new_token, made


@pytest.mark.parametrize("use_cache", [True, False])
async def test_a_function_of_no_argument_is_called_once_and_its_result_is_stored(
    krules_app: KRulesTestApp, use_cache: bool
) -> None:
    new_token, made = token_maker()
    s = krules_app.subject("session")
    await s.set("token", "old")

    assert await s.set("token", lambda: new_token(), use_cache=use_cache) == ("token-1", "old")
    await s.store()
    assert made == ["token-1"]
    assert await krules_app.stored("session") == {"token": "token-1"}
    changed = krules_app.recorder.of_type(SUBJECT_PROPERTY_CHANGED)[-1]
    assert (changed.data["old_value"], changed.data["value"]) == ("old", "token-1")


@pytest.mark.parametrize("use_cache", [True, False])
async def test_set_ext_takes_a_function_of_no_argument_too(
    krules_app: KRulesTestApp, use_cache: bool
) -> None:
    new_token, made = token_maker()
    s = krules_app.subject("session")

    assert await s.set_ext("token", new_token, use_cache=use_cache) == ("token-1", None)
    await s.store()
    assert made == ["token-1"]
    assert await krules_app.storage.load("session") == ({}, {"token": "token-1"})


async def test_a_function_of_no_argument_is_not_called_again_when_another_writer_stored_first(
    krules_app: KRulesTestApp,
) -> None:
    new_token, made = token_maker()
    mine, theirs = krules_app.subject("session"), krules_app.subject("session")
    await mine.set("token", new_token, muted=True)
    await theirs.set("token", "theirs", muted=True)
    await theirs.store()
    await mine.store()  # a plain write: the last writer wins, with the token its handler saw

    assert made == ["token-1"]
    assert await krules_app.stored("session") == {"token": "token-1"}
    assert await mine.get("token") == "token-1"


async def test_callables_that_are_not_plain_functions_of_no_argument_get_the_old_value(
    krules_app: KRulesTestApp,
) -> None:
    class AddOne:
        def __call__(self, n: Any) -> int:
            return (n or 0) + 1

    def wrapped_zero() -> int:
        return 100

    @functools.wraps(wrapped_zero)
    def wrapper(*args: Any) -> int:
        return wrapped_zero(*args)

    s = krules_app.subject("s")
    await s.set("n", 1, muted=True)
    assert await s.set("n", functools.partial(operator.add, 10), muted=True) == (11, 1)
    assert await s.set("n", AddOne(), muted=True) == (12, 11)
    assert await s.set("n", lambda n=0: n * 2, muted=True) == (24, 12)  # a parameter, with a default
    assert await s.set("n", wrapper, muted=True) == (100, 24)  # KRules reads the wrapped signature


# -- store() drops the cache, as in KRules --------------------------------------------------------


async def test_after_store_a_long_lived_subject_reads_what_another_writer_stored(
    krules_app: KRulesTestApp,
) -> None:
    reader, writer = krules_app.subject("user-1"), krules_app.subject("user-1")
    await reader.set("name", "Ada", muted=True)
    await reader.store()

    await writer.set("name", "Grace", muted=True)
    await writer.store()

    assert await reader.get("name") == "Grace"


async def test_a_store_with_nothing_to_write_still_makes_the_next_read_load(
    krules_app: KRulesTestApp,
) -> None:
    reader, writer = krules_app.subject("user-1"), krules_app.subject("user-1")
    assert await reader.get("email", default=None) is None
    await writer.set("email", "ada@example.com", muted=True)
    await writer.store()
    assert await reader.get("email", default=None) is None  # still its cache, as in KRules

    await reader.store()

    assert await reader.get("email") == "ada@example.com"
    assert await reader.get_ext_props() == {}


async def test_within_a_turn_a_subject_keeps_its_view_after_store(krules_app: KRulesTestApp) -> None:
    other_client = KRulesTestApp(storage=krules_app.storage)  # another instance on the same storage
    seen: list[int] = []

    @krules_app.on("count")
    async def count(ctx: EventContext) -> None:
        await ctx.subject.set("n", 1, muted=True)
        await ctx.subject.store()
        await other_client.subject("counter").set("n", 2, muted=True, use_cache=False)
        seen.append(await ctx.subject.get("n"))

    await krules_app.emit("count", "counter")

    assert seen == [1]
    assert await krules_app.stored("counter") == {"n": 2}


async def test_a_subject_stored_in_a_handler_reads_anew_once_the_turn_is_over(
    krules_app: KRulesTestApp,
) -> None:
    other_client = KRulesTestApp(storage=krules_app.storage)
    tracked = krules_app.subject("counter")  # outlives the turns that write it

    @krules_app.on("count")
    async def count(ctx: EventContext) -> None:
        await tracked.set("n", lambda n: (n or 0) + 1, muted=True)
        await tracked.store()

    await krules_app.emit("count", "counter")
    await other_client.subject("counter").set("n", 10, muted=True, use_cache=False)

    assert await tracked.get("n") == 10
