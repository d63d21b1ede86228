"""The dispatcher: turns, per-subject ordering, concurrent handlers, loop guard and auto-store.

Hot path of one event: one memoised registry lookup, one :class:`EventContext` per matching
handler, and the handler's pre-composed middleware chain.  A single matching handler runs inline in
the caller's task; several run concurrently in a task group.  A handler that raises (or whose filter
raises) is logged and recorded on the turn; the other handlers and the cascade go on.

Root events (from the HTTP ingress, a stream, or ``emit`` outside a handler) each start a
:class:`~krules.turn.Turn`.  Turns for the same subject run one at a time in arrival order (a lane
per subject); turns for different subjects run concurrently up to ``max_concurrent_turns``.  When a
turn's cascade is over, the cached writes of every subject it touched are stored in one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Callable, Coroutine
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, Final

from krules.clock import Clock, SystemClock
from krules.config import Settings
from krules.context import EventContext, _current
from krules.errors import CascadeDepthExceeded, EventFormatError
from krules.events import Event, IdGenerator
from krules.subject import Subject
from krules.turn import HandlerFailure, Turn
from middleware.base import SkipEvent

if TYPE_CHECKING:
    from krules.rules import Rule, RuleRegistry
    from storage.base import SubjectStorage

__all__ = ["Engine"]

logger = logging.getLogger(__name__)

_EXTENSION_NAME: Final = re.compile(r"^[a-z0-9]{1,20}$")

EventObserver = Callable[[Event], None]
FailureObserver = Callable[[HandlerFailure], None]


def _subject_name(subject: Any) -> tuple[str, Subject | None]:
    if isinstance(subject, Subject):
        return subject.name, subject
    if isinstance(subject, str) and subject:
        return subject, None
    raise EventFormatError(f"An event's subject must be a Subject or a non-empty string, not {subject!r}.")


def _check_payload(payload: Any) -> dict[str, Any]:
    if payload is None:
        return {}
    if type(payload) is not dict:
        if isinstance(payload, dict):
            return dict(payload)
        raise EventFormatError(
            f"An event payload must be a dict (a JSON object), not {type(payload).__name__}: {payload!r}."
        )
    return payload


def _check_extensions(extensions: dict[str, Any]) -> dict[str, Any] | None:
    for name in extensions:
        if not _EXTENSION_NAME.match(name):
            raise EventFormatError(
                f"CloudEvents extension name {name!r} is invalid; use 1-20 lowercase letters or digits."
            )
    return extensions or None


class Engine:
    """Runs rules over events for one app: the thing a container's providers assemble."""

    def __init__(
        self,
        registry: RuleRegistry,
        storage: SubjectStorage,
        settings: Settings | None = None,
        clock: Clock | None = None,
        ids: Callable[[], str] | None = None,
    ) -> None:
        self.registry = registry
        self.storage = storage
        self.settings = settings or Settings()
        self.clock: Clock = clock or SystemClock()
        self._now = self.clock.now
        self._ids = ids or IdGenerator()
        self._max_depth = self.settings.max_cascade_depth
        self._source = self.settings.source
        # subject -> waiters for its lane (None: busy, nobody waiting); absent: free
        self._lanes: dict[str, deque[asyncio.Future[None]] | None] = {}
        self._max_running = self.settings.max_concurrent_turns
        self._running = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._closed = False
        self.event_observers: list[EventObserver] = []
        self.failure_observers: list[FailureObserver] = []

    # -- building events and subjects ----------------------------------------------------------
    def new_event(
        self,
        event_type: str,
        subject: str,
        data: dict[str, Any] | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> Event:
        """A root event with a fresh id from this instance."""
        return Event(
            event_type,
            subject,
            data if data is not None else {},
            self._ids(),
            self._source,
            self._now(),
            0,
            None,
            extensions,
        )

    def subject(self, name: str) -> Subject:
        """Inside a handler, the turn's cached subject ``name``; outside, a new subject object."""
        ctx = _current.get()
        if ctx is not None and ctx._engine is self:
            return ctx.turn.subject(name)
        return Subject(name, self)

    # -- emitting ----------------------------------------------------------------------------
    def emit(
        self,
        event_type: str,
        subject: Subject | str,
        payload: dict[str, Any] | None = None,
        **extensions: Any,
    ) -> Coroutine[Any, Any, Any]:
        """Emit an event (``await`` it): inside a handler it joins the cascade, outside it starts a turn."""
        # Hot-path functions here validate eagerly and return the coroutine to await, saving a frame.
        ctx = _current.get()
        if ctx is not None and ctx._engine is self:
            return self.emit_child(ctx, event_type, payload, subject, extensions)
        if event_type.__class__ is not str or not event_type:
            raise EventFormatError(f"An event type must be a non-empty string, not {event_type!r}.")
        name, subject_obj = _subject_name(subject)
        event = self.new_event(
            event_type, name, _check_payload(payload), _check_extensions(extensions) if extensions else None
        )
        return self.process(event, subject_obj)

    def emit_child(
        self,
        ctx: EventContext,
        event_type: str,
        payload: dict[str, Any] | None,
        subject: Subject | str | None,
        extensions: dict[str, Any] | None,
    ) -> Coroutine[Any, Any, None]:
        """Emit an event caused by ``ctx``'s event; ``await`` the result to handle it inline in the turn."""
        if event_type.__class__ is not str or not event_type:
            raise EventFormatError(f"An event type must be a non-empty string, not {event_type!r}.")
        if subject is None:
            subject_obj: Subject | None = ctx.subject
            name = ctx.subject.name
        else:
            name, subject_obj = _subject_name(subject)
        if payload is None:
            payload = {}
        elif payload.__class__ is not dict:
            payload = _check_payload(payload)
        parent = ctx._event
        if parent.depth >= self._max_depth:
            raise CascadeDepthExceeded(self._max_depth, [*parent.chain(), f"{event_type}({name})"])
        child = parent.child(
            event_type, name, payload, self._now(), _check_extensions(extensions) if extensions else None
        )
        return self._dispatch(child, ctx.turn, subject_obj, None)

    def check_depth(self, subject: str, event_type: str) -> None:
        """Raise CascadeDepthExceeded *before* a write whose event would pass the depth limit."""
        ctx = _current.get()
        if ctx is not None and ctx._event.depth >= self._max_depth and ctx._engine is self:
            raise CascadeDepthExceeded(self._max_depth, [*ctx._event.chain(), f"{event_type}({subject})"])

    def emit_change(
        self, subject: Subject, event_type: str, data: dict[str, Any], extra: dict[str, Any] | None
    ) -> Coroutine[Any, Any, Any]:
        """Dispatch a subject's own event (property changed/deleted) inline, with ``ctx.subject`` = it."""
        ctx = _current.get()
        if ctx is not None and ctx._engine is self:
            child = ctx._event.child(event_type, subject.name, data, self._now(), None)
            return self._dispatch(child, ctx.turn, subject, extra)
        return self.process(self.new_event(event_type, subject.name, data), subject, extra)

    # -- turns -------------------------------------------------------------------------------
    async def process(
        self, event: Event, subject: Subject | None = None, extra: dict[str, Any] | None = None
    ) -> Turn:
        """Run one root event as a turn: wait for its subject's lane, cascade, then store.

        Raises a StorageError when the turn's writes cannot be stored (nothing of the turn is then
        stored); handler failures do not raise, they are on ``turn.failures``.
        """
        name = event.subject
        self._inflight += 1
        try:
            if name in self._lanes:
                await self._wait_for_lane(name)
            else:
                self._lanes[name] = None
            try:
                if self._running >= self._max_running:
                    await self._wait_for_slot()
                self._running += 1
                try:
                    turn = Turn(self, event)
                    if subject is not None:
                        turn.adopt(subject)
                    await self._dispatch(event, turn, subject, extra)
                    await turn.commit()
                    return turn
                finally:
                    self._running -= 1
                    self._wake(self._slot_waiters)
            finally:
                self._release(name)
        finally:
            self._inflight -= 1
            if not self._inflight and self._idle is not None:
                self._idle.set()

    async def _wait_for_lane(self, name: str) -> None:
        queue = self._lanes[name]
        if queue is None:
            queue = self._lanes[name] = deque()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(name)  # the lane was handed to us just before the cancel
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
            raise

    async def _wait_for_slot(self) -> None:
        while self._running >= self._max_running:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(self._slot_waiters)  # pass the wake-up on
                raise

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]]) -> bool:
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False

    def _release(self, name: str) -> None:
        queue = self._lanes.get(name)
        if queue is None or not self._wake(queue):  # else the lane is handed over in arrival order
            del self._lanes[name]

    async def settled(self) -> None:
        """Wait until no turn is running or waiting."""
        while self._inflight:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()

    # -- dispatch ----------------------------------------------------------------------------
    async def _dispatch(
        self, event: Event, turn: Turn, subject: Subject | None, extra: dict[str, Any] | None
    ) -> None:
        if self.event_observers:
            for observe in self.event_observers:
                observe(event)
        rules = self.registry.match(event.type)
        if not rules:
            return
        if subject is None:
            subject = turn.subject(event.subject)
        if len(rules) != 1:
            async with asyncio.TaskGroup() as group:
                for rule in rules:
                    group.create_task(self._run(rule, EventContext(self, turn, event, subject, rule, extra)))
            return
        # One handler: run it right here, in the caller's task (the body of _run, inlined: hot path).
        rule = rules[0]
        ctx = EventContext(self, turn, event, subject, rule, extra)
        token = _current.set(ctx)
        try:
            if not rule.filters or await self._passes(rule, ctx):
                await rule.call(ctx)
        except SkipEvent:
            pass
        except Exception as exc:
            self._failed(ctx, exc, "handler")
        finally:
            _current.reset(token)

    async def _run(self, rule: Rule, ctx: EventContext) -> None:
        token = _current.set(ctx)
        try:
            if not rule.filters or await self._passes(rule, ctx):
                await rule.call(ctx)
        except SkipEvent:
            pass
        except Exception as exc:
            self._failed(ctx, exc, "handler")
        finally:
            _current.reset(token)

    async def _passes(self, rule: Rule, ctx: EventContext) -> bool:
        for check, is_async in rule.filters:
            try:
                ok = check(ctx)
                if is_async or (ok.__class__ is not bool and isawaitable(ok)):
                    ok = await ok
            except Exception as exc:
                self._failed(ctx, exc, "filter")
                return False
            if not ok:
                return False
        return True

    def _failed(self, ctx: EventContext, exc: Exception, where: str) -> None:
        event = ctx._event
        failure = HandlerFailure(ctx.handler_name, event, exc)
        ctx.turn.failures.append(failure)
        logger.error(
            "%s of %s failed on %s for subject %r (event %s): %s: %s",
            where,
            ctx.handler_name,
            event.type,
            event.subject,
            event.id,
            type(exc).__name__,
            exc,
            exc_info=None if isinstance(exc, CascadeDepthExceeded) else exc,
        )
        for observe in self.failure_observers:
            observe(failure)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Check the storage is reachable (a clear StorageError otherwise)."""
        await self.storage.check()

    async def close(self) -> None:
        """Wait for running turns, then release the storage (once; later calls do nothing)."""
        await self.settled()
        if not self._closed:
            self._closed = True
            await self.storage.close()
