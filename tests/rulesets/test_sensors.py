"""The cache-strategy example: immediate writes, one batched store, and the overheat reaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from krules import EventContext
from krules.event_types import SUBJECT_PROPERTY_CHANGED
from krules.testing import KRulesTestApp
from storage.base import SubjectChanges


@pytest.fixture
def app(krules_app: KRulesTestApp) -> KRulesTestApp:
    krules_app.load("rulesets.sensors")
    return krules_app


def spy_on_store(app: KRulesTestApp) -> list[list[tuple[str, list[str]]]]:
    """Record every batch the storage is asked to store: ``[(subject, [properties]), ...]``."""
    batches: list[list[tuple[str, list[str]]]] = []
    store = app.storage.store

    async def recording_store(batch: Sequence[SubjectChanges]) -> None:
        batches.append([(changes.name, sorted(changes.props)) for changes in batch])
        await store(batch)

    app.storage.store = recording_store  # type: ignore[method-assign]
    return batches


def snapshot_storage_on_change(app: KRulesTestApp, prop: str) -> list[dict[str, Any]]:
    """Register a probe that records what storage holds when ``prop`` changes (mid-cascade)."""
    seen: list[dict[str, Any]] = []

    @app.on(SUBJECT_PROPERTY_CHANGED)
    @app.when(lambda ctx: ctx.property_name == prop)
    async def probe(ctx: EventContext) -> None:
        seen.append(await app.stored(ctx.subject.name))

    return seen


async def test_a_reading_is_in_storage_before_the_turn_ends(app: KRulesTestApp) -> None:
    seen = snapshot_storage_on_change(app, "last_reading")

    await app.emit("sensor.reading", "sensor-1", {"value": 21.5})
    await app.settle()

    assert seen == [{"last_reading": 21.5, "reading_count": 1}]


async def test_readings_are_counted_without_emitting_a_change_for_the_count(app: KRulesTestApp) -> None:
    for value in (20, 21, 21):
        await app.emit("sensor.reading", "sensor-1", {"value": value})
    await app.settle()

    assert await app.stored("sensor-1") == {"last_reading": 21, "reading_count": 3}
    # the repeated 21 is not a change; the muted count never is
    assert app.recorder.changes("sensor-1") == [("last_reading", 20), ("last_reading", 21)]


async def test_each_reading_is_written_without_a_batch_at_the_end_of_the_turn(app: KRulesTestApp) -> None:
    batches = spy_on_store(app)

    await app.emit("sensor.reading", "sensor-1", {"value": 20})
    await app.settle()

    assert batches == []
    assert await app.stored("sensor-1") == {"last_reading": 20, "reading_count": 1}


async def test_a_reading_without_a_numeric_value_fails_visibly_and_stores_nothing(app: KRulesTestApp) -> None:
    await app.emit("sensor.reading", "sensor-1", {"value": "hot"})
    await app.settle()

    [failure] = app.recorder.failures
    assert failure.handler == "rulesets.sensors.record_reading"
    assert isinstance(failure.error, ValueError)
    assert "'hot'" in str(failure.error)
    assert await app.stored("sensor-1") == {}


async def test_a_profile_update_is_stored_in_one_batch(app: KRulesTestApp) -> None:
    batches = spy_on_store(app)
    seen = snapshot_storage_on_change(app, "address")

    await app.emit(
        "user.profile_update",
        "user-123",
        {"name": "Ada", "email": "ada@example.com", "address": "12 Analytical Row"},
    )
    await app.settle()

    assert seen == [{}]  # cached: nothing written while the fields were being set
    assert batches == [[("user-123", ["address", "email", "name"])]]
    assert await app.stored("user-123") == {
        "name": "Ada",
        "email": "ada@example.com",
        "address": "12 Analytical Row",
    }


async def test_a_profile_update_sets_only_the_profile_fields_it_carries(app: KRulesTestApp) -> None:
    await app.emit("user.profile_update", "user-123", {"name": "Ada", "email": "ada@example.com"})
    await app.emit("user.profile_update", "user-123", {"email": "ada@lovelace.org", "role": "admin"})
    await app.settle()

    assert await app.stored("user-123") == {"name": "Ada", "email": "ada@lovelace.org"}
    assert app.recorder.changes("user-123") == [
        ("name", "Ada"),
        ("email", "ada@example.com"),
        ("email", "ada@lovelace.org"),
    ]


async def test_a_reading_crossing_the_threshold_raises_one_overheat_alert(app: KRulesTestApp) -> None:
    for value in (70, 85, 90, 95):
        await app.emit("sensor.reading", "sensor-1", {"value": value})
    await app.settle()

    [alert] = app.recorder.of_type("alert.overheat")
    assert alert.subject == "sensor-1"
    assert alert.data == {"value": 85, "previous": 70, "threshold": 80.0}


async def test_the_alert_is_raised_again_after_the_sensor_cooled_down(app: KRulesTestApp) -> None:
    for value in (85, 75, 82, 80, 81):
        await app.emit("sensor.reading", "sensor-1", {"value": value})
    await app.settle()

    assert [(a.data["value"], a.data["previous"]) for a in app.recorder.of_type("alert.overheat")] == [
        (85, None),
        (82, 75),
        (81, 80),
    ]


async def test_a_reading_at_the_threshold_is_not_an_overheat(app: KRulesTestApp) -> None:
    await app.emit("sensor.reading", "sensor-1", {"value": 80})
    await app.settle()

    assert app.recorder.of_type("alert.overheat") == []


async def test_other_property_changes_do_not_raise_alerts(app: KRulesTestApp) -> None:
    await app.emit("user.profile_update", "user-9", {"name": "Hot Rod", "address": 99})
    await app.settle()

    assert app.recorder.of_type("alert.overheat") == []
    assert app.recorder.failures == []
