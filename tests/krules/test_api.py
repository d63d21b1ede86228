"""The public API: module-level decorators on the default app, containers, provider overrides."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from dependency_injector import providers

import krules
from krules import KRulesContainer, emit, on, subject, use_container, when
from krules.context import EventContext
from storage.memory import MemoryStorage


@pytest.fixture
def default_app() -> Iterator[KRulesContainer]:
    with use_container(KRulesContainer()) as container:
        yield container


async def test_module_level_api_is_bound_to_the_default_app(default_app: KRulesContainer) -> None:
    seen: list[Any] = []

    @on("order.submitted")
    @when(lambda ctx: ctx.payload["total"] > 0)
    async def validate(ctx: EventContext) -> None:
        order = subject(ctx.subject.name)
        await order.set("status", "validated")
        await emit("order.validated", order)

    @on("order.validated")
    async def validated(ctx: EventContext) -> None:
        seen.append(await ctx.subject.get("status"))

    await emit("order.submitted", "order-1", {"total": 5})
    assert seen == ["validated"]
    assert await subject("order-1").get("status") == "validated"


async def test_containers_are_isolated_apps_as_in_krules() -> None:
    one, two = KRulesContainer(), KRulesContainer()
    on1, _, _, emit1 = one.handlers()
    _, _, _, emit2 = two.handlers()
    ran: list[str] = []

    @on1("x")
    async def handler(ctx: EventContext) -> None:
        ran.append(ctx.subject.name)

    await emit1("x", "a")
    await emit2("x", "b")
    assert ran == ["a"]
    assert one.subject("a").name == "a"


async def test_the_storage_provider_can_be_overridden() -> None:
    container = KRulesContainer()
    storage = MemoryStorage()
    container.subject_storage.override(providers.Object(storage))
    s = container.subject("user-1")
    await s.set("name", "Ada", muted=True)
    await s.store()
    assert await storage.load("user-1") == ({"name": "Ada"}, {})


def test_the_public_names_are_exported() -> None:
    for name in ("on", "when", "middleware", "emit", "subject", "KRulesContainer", "EventContext", "Subject"):
        assert hasattr(krules, name)
    from krules.event_types import SUBJECT_DELETED, SUBJECT_PROPERTY_CHANGED, SUBJECT_PROPERTY_DELETED

    assert (SUBJECT_PROPERTY_CHANGED, SUBJECT_PROPERTY_DELETED, SUBJECT_DELETED) == (
        "subject-property-changed",
        "subject-property-deleted",
        "subject-deleted",
    )


@pytest.mark.parametrize(
    "module", ["storage.base", "storage.memory", "storage.redis", "krules.errors", "krules"]
)
def test_each_package_imports_first_in_a_fresh_interpreter(module: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
