"""Testing helpers and the ``krules`` pytest plugin.

The ``krules_app`` fixture gives each test an isolated app on memory storage, with a recorder of
every dispatched event, a fake clock and a way to wait until the cascade is quiet::

    async def test_orders_ship(krules_app):
        krules_app.load("rulesets.orders")
        await krules_app.emit("order.submitted", "order-1", {"total": 30})
        await krules_app.settle()
        assert krules_app.recorder.types() == ["order.submitted", ...]

Outside pytest, :class:`KRulesTestApp` works the same (``async with KRulesTestApp() as app``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import pytest
from dependency_injector import providers

from krules.app import use_container
from krules.config import Settings
from krules.container import KRulesContainer
from krules.engine import Engine
from krules.events import Event
from krules.loader import load_rule_module
from krules.subject import Subject
from krules.turn import HandlerFailure
from storage.base import SubjectStorage
from storage.memory import MemoryStorage

__all__ = ["EventRecorder", "FakeClock", "KRulesTestApp", "krules_app"]


class FakeClock:
    """A clock that only moves when told to; ``sleep`` advances it at once instead of waiting."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        """Record the sleep, advance the clock, and yield to the loop once."""
        self.sleeps.append(seconds)
        self._now += max(seconds, 0.0)
        await asyncio.sleep(0)


class EventRecorder:
    """Records every event the engine dispatches (root events and the whole cascade) and every failure."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.failures: list[HandlerFailure] = []

    def record_event(self, event: Event) -> None:
        self.events.append(event)

    def record_failure(self, failure: HandlerFailure) -> None:
        self.failures.append(failure)

    def types(self, subject: str | None = None) -> list[str]:
        """Event types in dispatch order (optionally of one subject)."""
        return [e.type for e in self.events if subject is None or e.subject == subject]

    def of_type(self, event_type: str) -> list[Event]:
        """The recorded events of one type."""
        return [e for e in self.events if e.type == event_type]

    def changes(self, subject: str | None = None) -> list[tuple[str, Any]]:
        """``(property, value)`` of every ``subject-property-changed`` event, in order."""
        return [
            (e.data["property_name"], e.data["value"])
            for e in self.events
            if e.type == "subject-property-changed" and (subject is None or e.subject == subject)
        ]

    def clear(self) -> None:
        self.events.clear()
        self.failures.clear()


class KRulesTestApp:
    """An isolated krules app for tests: its own container, memory storage, recorder and fake clock."""

    def __init__(
        self,
        storage: SubjectStorage | None = None,
        settings: Settings | None = None,
        clock: FakeClock | None = None,
    ) -> None:
        self.container = KRulesContainer()
        self.clock = clock or FakeClock()
        self.storage: SubjectStorage = storage or MemoryStorage()
        self.container.subject_storage.override(providers.Object(self.storage))
        self.container.settings.override(providers.Object(settings or Settings()))
        self.container.clock.override(providers.Object(self.clock))
        self.recorder = EventRecorder()
        self.on, self.when, self.middleware, self._emit = self.container.handlers()
        self.modules: list[ModuleType] = []

    @property
    def engine(self) -> Engine:
        """The app's engine (created on first use, with the recorder attached)."""
        engine: Engine = self.container.engine()
        if self.recorder.record_event not in engine.event_observers:
            engine.event_observers.append(self.recorder.record_event)
            engine.failure_observers.append(self.recorder.record_failure)
        return engine

    def load(self, *modules: str) -> list[ModuleType]:
        """Run rule modules (dotted names or paths) so their ``@on`` rules register on this app."""
        loaded = []
        with use_container(self.container):
            for name in modules:
                loaded.append(load_rule_module(name, fresh=True))
        self.modules.extend(loaded)
        return loaded

    async def emit(
        self, event_type: str, subject: Subject | str, payload: dict[str, Any] | None = None, **ext: Any
    ) -> None:
        """Emit a root event and run its whole cascade."""
        await self.engine.emit(event_type, subject, payload, **ext)

    def subject(self, name: str) -> Subject:
        """A fresh subject object (reads what is stored)."""
        return self.engine.subject(name)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until no turn is running or queued (fails the test after ``timeout`` seconds)."""
        await asyncio.wait_for(self.engine.settled(), timeout)

    async def stored(self, name: str) -> dict[str, Any]:
        """What the storage holds for subject ``name`` (properties only)."""
        props, _ = await self.storage.load(name)
        return props

    async def close(self) -> None:
        await self.settle()
        await self.engine.close()

    async def __aenter__(self) -> KRulesTestApp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


try:  # async fixtures need pytest-asyncio; without it the helpers above still work
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover
    _async_fixture = pytest.fixture  # type: ignore[assignment]


@_async_fixture
async def krules_app() -> AsyncIterator[KRulesTestApp]:
    """An isolated krules app on memory storage with a recorder and a fake clock."""
    app = KRulesTestApp()
    try:
        with use_container(app.container):  # module-level on/emit/subject in the test reach this app
            yield app
    finally:
        await app.close()
