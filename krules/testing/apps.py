"""What a test drives krules with: :class:`KRulesTestApp` (an isolated app on memory storage),
:class:`RedisModeApp` (a Redis-mode instance in the test's process), the :class:`EventRecorder` and
:class:`FakeClock` they use, and :func:`wait_until`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

from dependency_injector import providers

from krules.app import use_container
from krules.config import Settings
from krules.container import KRulesContainer
from krules.engine import Engine
from krules.events import Event
from krules.loader import load_rule_module
from krules.subject import Subject
from krules.transport.worker import PartitionWorker
from krules.turn import HandlerFailure
from storage.base import SubjectStorage
from storage.memory import MemoryStorage

__all__ = ["EventRecorder", "FakeClock", "KRulesTestApp", "RedisModeApp", "wait_until"]


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

    async def advance(self, seconds: float) -> int:
        """Move the clock ``seconds`` forward, firing each timer that comes due on the way at its due
        time (the clock reads that time while it is handled) with its whole cascade; return how many
        fired.  A test of a 30-minute timeout is ``await app.advance(1800)``."""
        if seconds < 0:
            raise ValueError(f"Time only moves forward; advance({seconds!r}) is negative.")
        target = self.clock.now() + seconds
        engine = self.engine
        next_due = getattr(self.storage, "next_due", None)
        fired = 0
        while next_due is not None:
            due = next_due()
            if due is None or due > target:
                break
            if due > self.clock.now():
                self.clock.advance(due - self.clock.now())
            fired += await engine.fire_due_timers()
            await self.settle()
        if target > self.clock.now():
            self.clock.advance(target - self.clock.now())
        return fired

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


class RedisModeApp:
    """A Redis-mode instance in this process, for tests: its own container on Redis storage, the
    engine's transport the partition streams, and its partition worker running as a task.

    ``settings`` override :class:`~krules.config.Settings` (defaults here: 2 partitions, short
    blocking reads and claim time, so tests do not wait).  ``middleware=True`` installs the default
    chain as ``krules run`` does (its metrics in ``app.instance.chain.metrics``); by default none.
    Register rules with ``app.on``, then ``await app.start()``; ``await app.stop()`` stops reading,
    lets the turns under way commit and closes the engine.
    """

    def __init__(self, url: str, key_prefix: str, *, middleware: bool = False, **settings: Any) -> None:
        from krules.assembly import assemble  # the Redis drivers only when this is used

        defaults: dict[str, Any] = {"partitions": 2, "stream_block_ms": 50, "claim_idle_ms": 300}
        self.settings = Settings(redis_url=url, key_prefix=key_prefix, **{**defaults, **settings})
        self.instance = assemble(self.settings, middleware=middleware)
        self.container = self.instance.container
        self.storage: Any = self.instance.storage
        self.on, self.when, self.middleware, self.emit = self.container.handlers()
        self._task: asyncio.Future[None] | None = None

    @property
    def engine(self) -> Engine:
        """The app's engine."""
        return self.instance.engine

    @property
    def worker(self) -> PartitionWorker:
        """The partition worker (the engine's transport is the partition streams)."""
        worker = self.instance.worker
        if worker is None:
            raise RuntimeError("a Redis-mode app always has a worker")
        return worker

    async def start(self) -> None:
        """Start the engine (checks, chain frozen) and the worker."""
        await self.engine.start()
        self._task = asyncio.ensure_future(self.worker.run())

    async def stop(self) -> None:
        """Stop reading, let the turns under way commit, close the engine (safe to call twice)."""
        task, self._task = self._task, None
        if task is not None:
            self.worker.stop()
            await task
        await self.engine.close()


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``await check()`` until it is true; AssertionError naming it after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{getattr(check, '__name__', check)!r} did not hold within {timeout} s")
        await asyncio.sleep(0.02)
