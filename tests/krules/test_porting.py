"""What a KRules 3 rule module relies on and finds here once its imports are changed (KRules' own
documentation and code say what each name holds and does)."""

from __future__ import annotations

from typing import Any

import pytest
from dependency_injector import providers

from krules import KRulesContainer, Subject, event_types
from krules.context import EventContext
from krules.errors import ConfigurationError
from krules.subject import PayloadConst, PropertyType
from krules.testing import KRulesTestApp
from storage.memory import MemoryStorage

# -- krules.event_types (KRules: krules_core.event_types) ----------------------------------------


def test_event_types_has_every_name_krules_exports_with_its_value() -> None:
    assert {name: getattr(event_types, name) for name in event_types.__all__} == {
        "SUBJECT_PROPERTY_CHANGED": "subject-property-changed",
        "SubjectPropertyChanged": "subject-property-changed",
        "SUBJECT_PROPERTY_DELETED": "subject-property-deleted",
        "SubjectPropertyDeleted": "subject-property-deleted",
        "SUBJECT_DELETED": "subject-deleted",
        "SubjectDeleted": "subject-deleted",
        "SUBJECT_FLUSHED": "subject-deleted",
        "SubjectFlushed": "subject-deleted",
        "SUBJECT_EXPIRED": "subject-expired",  # krules' own: subject expiry
    }


async def test_a_rule_on_subject_flushed_runs_when_the_subject_is_flushed(krules_app: KRulesTestApp) -> None:
    flushed: list[tuple[str, Any]] = []

    @krules_app.on(event_types.SUBJECT_FLUSHED)
    async def on_flushed(ctx: EventContext) -> None:
        flushed.append((ctx.subject.name, ctx.payload["props"]))

    user = krules_app.subject("user-1")
    await user.set("name", "Ada", muted=True)
    await user.flush()
    assert flushed == [("user-1", {"name": "Ada"})]


# -- krules.subject (KRules: krules_core.subject) ------------------------------------------------


def test_payload_const_and_property_type_hold_what_krules_gives_them() -> None:
    assert (PayloadConst.PROPERTY_NAME, PayloadConst.VALUE, PayloadConst.OLD_VALUE) == (
        "property_name",
        "value",
        "old_value",
    )
    assert (PropertyType.DEFAULT, PropertyType.EXTENDED) == ("p", "e")


async def test_a_property_event_is_read_with_payload_const_keys(krules_app: KRulesTestApp) -> None:
    seen: list[tuple[Any, Any, Any]] = []

    @krules_app.on(event_types.SUBJECT_PROPERTY_CHANGED)
    async def changed(ctx: EventContext) -> None:
        p = ctx.payload
        seen.append((p[PayloadConst.PROPERTY_NAME], p[PayloadConst.OLD_VALUE], p[PayloadConst.VALUE]))

    await krules_app.subject("device-1").set("temp", 21.5)
    assert seen == [("temp", None, 21.5)]


async def test_flush_returns_the_subject(krules_app: KRulesTestApp) -> None:
    user = krules_app.subject("user-1")
    await user.set("name", "Ada", muted=True)

    flushed = await user.flush()
    assert flushed is user
    assert await flushed.keys() == []


# -- the container and the constructor -----------------------------------------------------------


async def test_container_subject_accepts_krules_event_info() -> None:
    container = KRulesContainer()
    user = container.subject("user-1", event_info={"originid": "ev-1"})

    await user.set("name", "Ada", muted=True)
    assert user.name == "user-1"
    assert await user.get("name") == "Ada"


async def test_the_documented_krules_constructor_works_with_the_container_s_storage_and_event_bus() -> None:
    container = KRulesContainer()
    storage = MemoryStorage()
    container.subject_storage.override(providers.Object(storage))

    user = Subject("user-1", storage=container.subject_storage(), event_bus=container.event_bus())
    await user.set("name", "Ada", muted=True)
    await user.store()
    assert await storage.load("user-1") == ({"name": "Ada"}, {})
    assert container.event_bus() is container.engine()


def test_a_krules_constructor_given_another_storage_says_what_to_write_instead() -> None:
    container = KRulesContainer()
    with pytest.raises(ConfigurationError, match=r"override container\.subject_storage and write"):
        Subject("user-1", storage=MemoryStorage(), event_bus=container.event_bus())


def test_a_krules_constructor_without_the_engine_says_what_to_write_instead() -> None:
    with pytest.raises(ConfigurationError, match=r"write container\.subject\('user-1'\)"):
        Subject("user-1", storage=MemoryStorage(), event_bus=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"needs the app's engine, not None"):
        Subject("user-1")


def test_overriding_the_event_bus_is_refused_with_what_to_override_instead() -> None:
    container = KRulesContainer()
    with pytest.raises(ConfigurationError, match=r"override container\.middlewares"):
        container.event_bus.override(providers.Object(object()))
    assert container.event_bus() is container.engine()  # nothing was replaced


# -- a KRules deployment's environment -------------------------------------------------------------


def test_a_container_reads_a_krules_deployment_s_storage_variables_and_tolerates_a_test_suite_s_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "KRULES_STORAGE_PROVIDER": "redis",
        "KRULES_STORAGE_REDIS_HOST": "redis.internal",
        "KRULES_STORAGE_REDIS_PORT": "6390",
        "KRULES_STORAGE_REDIS_DB": "3",
        "KRULES_STORAGE_REDIS_KEY_PREFIX": "shop:",
        "KRULES_TEST_REDIS_URL": "redis://localhost:6379/15",  # a KRules test suite's, not a setting
    }.items():
        monkeypatch.setenv(name, value)

    settings = KRulesContainer().settings()

    assert (settings.redis_url, settings.key_prefix) == ("redis://redis.internal:6390/3", "shop:")


def test_a_container_reads_the_legacy_subjects_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBJECTS_REDIS_URL", "redis://legacy:6379/1")
    assert KRulesContainer().settings().redis_url == "redis://legacy:6379/1"


# -- emit's keyword arguments ----------------------------------------------------------------------


async def test_the_container_s_emit_passes_krules_keyword_metadata_and_extra_to_middleware() -> None:
    container = KRulesContainer()
    on, _when, middleware, emit = container.handlers()
    routed: list[tuple[Any, ...]] = []

    @middleware
    async def route(ctx: EventContext, next: Any) -> None:
        routed.append((ctx.get_metadata("topic"), ctx.get_metadata("dispatch_url"), ctx.extra))
        await next()

    @on("alert.critical")
    async def alert(ctx: EventContext) -> None:
        pass

    await emit(
        "alert.critical", "device-1", {}, topic="alerts", dispatch_url="https://x", extra={"why": "hot"}
    )

    assert routed == [("alerts", "https://x", {"why": "hot"})]
