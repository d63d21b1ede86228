"""A storage written for KRules 3 plugged into a krules app the way a KRules app plugs it in:
``container.subject_storage.override(providers.Object(factory))``."""

from __future__ import annotations

from typing import Any

import pytest
from dependency_injector import providers

from krules import KRulesContainer
from krules.context import EventContext
from krules.errors import ConfigurationError, StorageError
from storage.krules3 import KRules3Storage
from tests.storage.krules3_backend import dict_storage_factory

Shelf = dict[str, tuple[dict[str, Any], dict[str, Any]]]


def app_on(shelf: Shelf, calls: list[str]) -> KRulesContainer:
    container = KRulesContainer()
    container.subject_storage.override(providers.Object(dict_storage_factory(shelf, calls)))
    on, _, _, _ = container.handlers()

    @on("order.placed")
    async def place(ctx: EventContext) -> None:
        await ctx.subject.set("status", "placed")
        await ctx.subject.set("count", lambda n: (n or 0) + 1)
        await ctx.subject.set_ext("tenant", "t-1")

    @on("order.cancelled")
    async def cancel(ctx: EventContext) -> None:
        await ctx.subject.delete("status")
        await ctx.subject.set("count", lambda n: (n or 0) + 1)

    @on("order.touched")
    async def touch(ctx: EventContext) -> None:
        await ctx.subject.set("touched", lambda n: (n or 0) + 1, use_cache=False)

    return container


async def test_a_krules_storage_factory_given_to_the_container_stores_the_turns_of_its_rules() -> None:
    shelf: Shelf = {}
    calls: list[str] = []
    container = app_on(shelf, calls)
    emit = container.engine().emit

    await emit("order.placed", "order-1")
    await emit("order.cancelled", "order-1")

    assert isinstance(container.engine().storage, KRules3Storage)
    assert shelf["order-1"] == ({"count": 2}, {"tenant": "t-1"})
    stores = [c for c in calls if c.startswith("store")]
    assert stores == [
        "store order-1 inserts=['status', 'count', 'tenant'] updates=[] deletes=[]",
        "store order-1 inserts=[] updates=['count'] deletes=['status']",
    ]


async def test_a_direct_write_goes_through_the_backend_s_own_set() -> None:
    shelf: Shelf = {}
    container = app_on(shelf, [])

    for _ in range(3):
        await container.engine().emit("order.touched", "order-2")

    assert shelf["order-2"][0] == {"touched": 3}


async def test_a_callable_update_is_applied_again_when_the_backend_changed_meanwhile() -> None:
    shelf: Shelf = {}
    container = app_on(shelf, [])
    on, _, _, _ = container.handlers()

    @on("order.raced")
    async def raced(ctx: EventContext) -> None:
        await ctx.subject.set("count", lambda n: (n or 0) + 1)
        shelf["order-3"][0]["count"] = 10  # another writer, between this turn's read and its store

    shelf["order-3"] = ({"count": 1}, {})
    await container.engine().emit("order.raced", "order-3")

    assert shelf["order-3"][0]["count"] == 11


async def test_listing_subjects_of_a_krules_storage_is_refused_in_one_sentence() -> None:
    storage = KRules3Storage(dict_storage_factory())

    with pytest.raises(StorageError, match="cannot list subjects"):
        await storage.subjects()


def test_a_storage_that_is_neither_kind_is_refused_in_one_sentence() -> None:
    container = KRulesContainer()
    container.subject_storage.override(providers.Object(42))

    with pytest.raises(ConfigurationError, match=r"neither a krules storage .* nor a KRules storage factory"):
        container.engine()
