"""The dispatcher: turns, per-subject ordering, concurrent handlers, loop guard and auto-store.

One module of about 480 lines on purpose: the hot path of an event (``emit``, ``process``,
``_dispatch``, ``_run``) reads top to bottom in one class, its small steps inlined where they run.
What ``emit`` checks in an event is :mod:`krules.validation`.

Hot path of one event: one memoised registry lookup, one :class:`EventContext` per matching
handler, and the handler's pre-composed middleware chain.  A single matching handler runs inline in
the caller's task; several run concurrently in a task group (or one after another in registration
order, as in KRules, with ``KRULES_HANDLER_ORDER=sequential``).  A handler that raises (or whose filter
raises) is logged and recorded on the turn; the other handlers and the cascade go on.

Root events (from the HTTP ingress, a stream, or ``emit`` outside a handler) each start a
:class:`~krules.turn.Turn`.  Turns for the same subject run one at a time in arrival order (a lane
per subject); turns for different subjects run concurrently up to ``max_concurrent_turns``.  When a
turn's cascade is over, the cached writes of every subject it touched are stored in one batch.

A cascade that reaches another subject (``ctx.emit(..., subject="other")``) runs inline in the
current turn, as in KRules: it does not wait for that subject's lane.  In Redis mode (an engine
with a ``transport``), an event emitted during a stream turn to a subject of *another partition*
goes to that partition's stream instead, when the turn commits: its owner handles it, in order
with the subject's other events, and drops it if a re-run of this turn sends it again (its id is
derived from this event's, so it is the same).  Outside handlers, ``emit`` appends to the stream.

Every ``_BOUNCE_EVERY`` levels a cascade continues in a fresh task, so deep cascades (and long
middleware chains) never come near Python's recursion limit; the loop guard stops them first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextvars import Token
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, Final

from krules.admission import Admission
from krules.chain import SkipEvent
from krules.changes import SubjectChanges
from krules.clock import Clock, SystemClock
from krules.config import Settings
from krules.context import EventContext, _current
from krules.errors import CascadeDepthExceeded, EventFormatError, TurnEndedError, aborts_turn
from krules.events import (
    REPLAY_EXTENSION,
    TRACEPARENT_EXTENSION,
    Event,
    EventWithMetadata,
    IdGenerator,
    trace_context,
)
from krules.partitioning import partition_of
from krules.subject import Subject
from krules.timers import EXPIRE_KEY, SUBJECT_EXPIRED, TIMER_EXTENSION, Fired
from krules.turn import HandlerFailure, Turn
from krules.validation import check_json, check_payload, split_emit_keywords

if TYPE_CHECKING:
    from krules.ports import EventTransport, Receipt, SubjectStorage
    from krules.rules import Rule, RuleRegistry

__all__ = ["Engine"]

logger = logging.getLogger(__name__)

_BOUNCE_EVERY: Final = 16

EventObserver = Callable[[Event], None]
FailureObserver = Callable[[HandlerFailure], None]


def _subject_name(subject: Any) -> tuple[str, Subject | None]:
    if isinstance(subject, Subject):
        return subject.name, subject
    if isinstance(subject, str) and subject:
        return subject, None
    raise EventFormatError(f"An event's subject must be a Subject or a non-empty string, not {subject!r}.")


async def _sent() -> None:
    """What awaiting an event queued for another partition's stream comes to: nothing more."""


def _stays_local(
    event_type: str, local: dict[str, Any] | None, extra: dict[str, Any] | None
) -> EventFormatError:
    """The error for metadata that cannot reach a handler in another process."""
    names = ", ".join(f"{n}=" for n in [*(local or ()), *(["extra"] if extra is not None else [])])
    return EventFormatError(
        f"Event {event_type!r} goes through a partition stream, which carries CloudEvents extensions "
        f"only, so {names} would not reach its handlers; use names of 1-20 lowercase letters or digits "
        "with string, integer or boolean values, or put the value in the payload."
    )


def _turn_ended(turn: Turn, what: str) -> TurnEndedError:
    return TurnEndedError(
        f"{what} after the turn of event {turn.root.id!r} ended; emit from the handler itself, "
        "or start a new turn with engine.emit from background work."
    )


class Engine:
    """Runs rules over events for one app: the thing a container's providers assemble."""

    def __init__(
        self,
        registry: RuleRegistry,
        storage: SubjectStorage,
        settings: Settings | None = None,
        clock: Clock | None = None,
        ids: Callable[[], str] | None = None,
        transport: EventTransport | None = None,
    ) -> None:
        self.registry = registry
        self.storage = storage
        self.settings = settings or Settings()
        self.clock: Clock = clock or SystemClock()
        self._now = self.clock.now
        self._ids = ids or IdGenerator()
        self._max_depth = self.settings.max_cascade_depth
        self._source = self.settings.source
        self._partitions = self.settings.partition_count
        self._in_order = self.settings.handler_order == "sequential"
        self.transport = transport
        """Where root events go in Redis mode (the partition streams); None: processed here."""
        self._admission = Admission(self.settings.max_concurrent_turns)
        self._memo = registry.memo  # read directly on the hot path; the registry fills and clears it
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._closed = False
        self.event_observers: list[EventObserver] = []
        self.failure_observers: list[FailureObserver] = []
        self.stale_timers = 0
        """Timer firings that ran nothing: cancelled or scheduled again before their turn, or not
        fired by krules (see :meth:`_fire`)."""

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
    ) -> Awaitable[Any]:
        """Emit an event (``await`` it): inside a handler it joins the cascade, outside it starts a turn.

        Keyword arguments are the event's metadata, as in KRules (``ctx.get_metadata``; ``extra=``
        is ``ctx.extra``): :func:`~krules.validation.split_emit_keywords` says which travel."""
        # Hot-path functions here validate eagerly and return the coroutine to await, saving a frame.
        ctx = _current.get()
        if ctx is not None and ctx._engine is self:
            return self.emit_child(ctx, event_type, payload, subject, extensions)
        if event_type.__class__ is not str or not event_type:
            raise EventFormatError(f"An event type must be a non-empty string, not {event_type!r}.")
        if subject.__class__ is str and subject:
            name, subject_obj = subject, None
        else:
            name, subject_obj = _subject_name(subject)
        data = check_json(event_type, payload if payload.__class__ is dict else check_payload(payload))
        if extensions:
            return self._emit_with_keywords(event_type, name, subject_obj, data, extensions)
        event = self.new_event(event_type, name, data, None)
        if self.transport is not None:
            return self.transport.send([event])
        return self.process(event, subject_obj)

    def _emit_with_keywords(
        self,
        event_type: str,
        name: str,
        subject_obj: Subject | None,
        data: dict[str, Any],
        keywords: dict[str, Any],
    ) -> Awaitable[Any]:
        """:meth:`emit` of a root event given keyword arguments (apart, so a plain emit pays nothing)."""
        extensions, local, extra = split_emit_keywords(keywords)
        event = self.new_event(event_type, name, data, extensions)
        if local is not None:
            event = EventWithMetadata.of(event, local)
        if self.transport is not None:
            if local is not None or extra is not None:
                raise _stays_local(event_type, local, extra)
            return self.transport.send([event])
        return self.process(event, subject_obj, extra)

    def emit_child(
        self,
        ctx: EventContext,
        event_type: str,
        payload: dict[str, Any] | None,
        subject: Subject | str | None,
        extensions: dict[str, Any] | None,
        local: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Awaitable[None]:
        """Emit an event caused by ``ctx``'s event; ``await`` the result to handle it inline in the turn.

        ``extensions`` are ``emit``'s keyword arguments; ``local`` and ``extra`` are set from them
        (left to their defaults by callers: parameters rather than assignments on the plain path,
        which ``bench.instructions`` measured unchanged, 122,295 against 122,180-122,530)."""
        if event_type.__class__ is not str or not event_type:
            raise EventFormatError(f"An event type must be a non-empty string, not {event_type!r}.")
        turn = ctx.turn
        if turn.closed:
            raise _turn_ended(turn, f"Event {event_type!r} was emitted")
        if subject is None:
            subject_obj: Subject | None = ctx.subject
            name = ctx.subject.name
        else:
            name, subject_obj = _subject_name(subject)
            if subject_obj is not None:  # the same name must mean the same cached subject in a turn
                known = turn.subjects.get(name)
                if known is None:
                    turn.adopt(subject_obj)
                else:
                    if subject_obj.dirty:
                        turn.adopt(subject_obj)
                    subject_obj = known
        if payload is None:
            payload = {}
        elif payload.__class__ is not dict:
            payload = check_payload(payload)
        parent = ctx._event
        if parent.depth >= self._max_depth:
            raise CascadeDepthExceeded(self._max_depth, [*parent.chain(), f"{event_type}({name})"])
        if extensions:
            extensions, local, extra = split_emit_keywords(extensions)
        else:
            extensions = None
        # ctx.child_event, inlined (hot path)
        ctx.emitted = seq = ctx.emitted + 1
        if ctx.emit_extensions is not None:
            extensions = {**ctx.emit_extensions, **extensions} if extensions else ctx.emit_extensions
        if parent.extensions is not None and (extensions is None or TRACEPARENT_EXTENSION not in extensions):
            # No span of ours (tracing off): the caller's trace goes on, unchanged.
            carried = trace_context(parent.extensions)
            if carried is not None:
                extensions = {**carried, **extensions} if extensions else carried
        child = Event(
            event_type,
            name,
            payload,
            None,
            self._source,
            self._now(),
            parent.depth + 1,
            parent,
            extensions,
            seq,
            ctx.rule.key,
        )
        if local is not None:
            child = EventWithMetadata.of(child, local)
        receipt = turn.receipt
        if (
            receipt is not None
            and subject is not None
            and partition_of(name, self._partitions) != receipt.partition
        ):
            if local is not None or extra is not None:
                raise _stays_local(event_type, local, extra)
            turn.outbox.append(child)  # to its partition's stream when the turn commits
            return _sent()
        if child.depth % _BOUNCE_EVERY:
            return self._dispatch(child, turn, subject_obj, extra)
        return asyncio.ensure_future(self._dispatch(child, turn, subject_obj, extra))

    def handler_context(self) -> EventContext | None:
        """The context of the handler of this engine running in this task, if any."""
        ctx = _current.get()
        return ctx if ctx is not None and ctx._engine is self else None

    def check_depth(self, subject: str, event_type: str, ctx: EventContext | None) -> None:
        """Raise CascadeDepthExceeded *before* a write whose event would pass the depth limit."""
        if ctx is not None and ctx._event.depth >= self._max_depth:
            raise CascadeDepthExceeded(self._max_depth, [*ctx._event.chain(), f"{event_type}({subject})"])

    def emit_change(
        self,
        subject: Subject,
        event_type: str,
        data: dict[str, Any],
        extra: dict[str, Any] | None,
        ctx: EventContext | None,
    ) -> Awaitable[Any]:
        """Dispatch a subject's own event (property changed/deleted) inline, with ``ctx.subject`` = it.

        ``ctx`` is :meth:`handler_context`: the handler whose write caused it, or None (a new turn).
        """
        if ctx is None:
            return self.process(self.new_event(event_type, subject.name, data), subject, extra)
        turn = ctx.turn
        if turn.closed:
            raise _turn_ended(turn, f"Subject {subject.name!r} changed")
        child = ctx.child_event(event_type, subject.name, data, self._now(), None)
        if child.depth % _BOUNCE_EVERY:
            return self._dispatch(child, turn, subject, extra)
        return asyncio.ensure_future(self._dispatch(child, turn, subject, extra))

    # -- turns -------------------------------------------------------------------------------
    async def process(
        self,
        event: Event,
        subject: Subject | None = None,
        extra: dict[str, Any] | None = None,
        receipt: Receipt | None = None,
    ) -> Turn:
        """Run one root event as a turn: wait for its subject's lane, cascade, then store.

        With a ``receipt`` (an event taken from a partition stream) the end of the turn is a commit
        that also marks the event processed and acknowledges its entry.  Raises a StorageError when
        the turn's writes cannot be stored, or when a handler let a StorageError through (a read
        that gave up): nothing of the turn is then stored, and a stream event stays pending to be
        taken again.  Other handler failures do not raise, they are on ``turn.failures``.

        A timer's firing (an event carrying ``krulestimer``) is handled only if, now that the turn
        has its subject's lane, it is still live (:meth:`_fire`): otherwise it runs nothing and the
        turn only commits.
        """
        name = event.subject
        self._inflight += 1
        try:
            admission = self._admission
            if not admission.enter_now(name):
                await admission.enter(name)
            try:
                turn = Turn(self, event, receipt)
                if subject is not None:
                    turn.adopt(subject)
                extensions = event.extensions
                if not extensions:
                    await self._dispatch(event, turn, subject, extra)
                elif REPLAY_EXTENSION in extensions:
                    await self._replay(event, turn, subject, extra, str(extensions[REPLAY_EXTENSION]))
                elif TIMER_EXTENSION in extensions:
                    await self._fire(event, turn, subject, extra, receipt, str(extensions[TIMER_EXTENSION]))
                else:
                    await self._dispatch(event, turn, subject, extra)
                taken = turn.close()
                if turn.aborted is not None:
                    # A handler met a storage failure (e.g. Redis away past the retries): the turn
                    # cannot be complete, so none of it is stored and the event is not acknowledged.
                    for touched, changes in taken:
                        touched.restore_changes(changes)
                    raise turn.aborted
                if taken or receipt is not None or turn.outbox:
                    await turn.commit(taken)
                turn.release_subjects()
                return turn
            finally:
                admission.leave(name)
        finally:
            self._inflight -= 1
            if not self._inflight and self._idle is not None:
                self._idle.set()

    @property
    def inflight(self) -> int:
        """Root turns started and not finished: running, or waiting for their subject or a slot."""
        return self._inflight

    @property
    def queued(self) -> int:
        """Root turns waiting for their subject's lane or a slot (what ``KRULES_MAX_QUEUED_TURNS``
        bounds at the ingress); counted from figures the turns keep anyway, so it costs them nothing."""
        return self._inflight - self._admission.running

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
        rules = self._memo.get(event.type)
        if rules is None:
            rules = self.registry.match(event.type)
        if not rules:
            return
        if subject is None:
            subject = turn.subject(event.subject)
        if len(rules) == 1:
            # One handler: run it right here, in the caller's task (_run, inlined: the hot path).
            rule = rules[0]
            ctx = EventContext(self, turn, event, subject, rule, extra)
            single = _current.set(ctx)
            try:
                if not rule.filters or await self._passes(ctx, 0):
                    await rule.call(ctx)
            except SkipEvent:
                pass
            except Exception as exc:
                await self._handler_failed(ctx, exc)
            finally:
                _current.reset(single)
            return
        if self._in_order:
            await self._run_in_order(event, turn, subject, rules, extra)
            return
        # Several rules: their sync filters decide here, so rules filtered out cost no task.
        chosen: list[EventContext] = []
        token: Token[EventContext | None] | None = None
        try:
            for rule in rules:
                ctx = EventContext(self, turn, event, subject, rule, extra)
                if rule.sync_filters:
                    if token is None:
                        token = _current.set(ctx)
                    else:
                        _current.set(ctx)
                    if not self._passes_sync(ctx):
                        continue
                chosen.append(ctx)
        finally:
            if token is not None:
                _current.reset(token)
        if len(chosen) == 1:
            await self._run(chosen[0], chosen[0].rule.sync_filters)
        elif chosen:
            async with asyncio.TaskGroup() as group:
                for ctx in chosen:
                    group.create_task(self._run(ctx, ctx.rule.sync_filters))

    async def _run_in_order(
        self,
        event: Event,
        turn: Turn,
        subject: Subject,
        rules: tuple[Rule, ...],
        extra: dict[str, Any] | None,
    ) -> None:
        """KRules' order (``KRULES_HANDLER_ORDER=sequential``): each rule in registration order, its
        filters applied only when the rule before it (and the cascade that rule caused) is over, so
        they see its writes.  A failure is recorded and the next rule runs, as in KRules."""
        for rule in rules:
            await self._run(EventContext(self, turn, event, subject, rule, extra), 0)

    async def _replay(
        self, event: Event, turn: Turn, subject: Subject | None, extra: dict[str, Any] | None, handler: str
    ) -> None:
        """Deliver a replayed root event to the one handler it names (its cascade goes on as usual).

        A handler this instance has no rule for is stood in for by a rule that dead-letters the
        call (reason ``no_handler``, :meth:`RuleRegistry.stand_in`): the replay is never dropped."""
        if self.event_observers:
            for observe in self.event_observers:
                observe(event)
        rule = next((r for r in self.registry.match(event.type) if r.name == handler), None)
        if rule is None:
            rule = self.registry.stand_in(handler)
        ctx = EventContext(self, turn, event, subject or turn.subject(event.subject), rule, extra)
        await self._run(ctx, rule.sync_filters)  # as before: a replay's sync filters are not applied

    async def _fire(
        self,
        event: Event,
        turn: Turn,
        subject: Subject | None,
        extra: dict[str, Any] | None,
        receipt: Receipt | None,
        key: str,
    ) -> None:
        """The turn of a timer's firing (an event carrying ``krulestimer``), holding its subject's
        lane: handled only if the firing is still on its way (:meth:`Receipt.timer_live`, or the
        storage's bookkeeping in embedded mode), so that a cancel or a reschedule of the key
        committed by an earlier turn wins, and an event that no storage fired (written to a stream
        by hand) runs nothing; such a turn only commits (the event processed, its entry
        acknowledged).  A live firing's turn ends by forgetting its marker (:class:`Fired`)."""
        name = event.subject
        if receipt is not None:
            live = await receipt.timer_live(name, key)
        else:
            fired = getattr(self.storage, "timer_live", None)
            live = fired is not None and await fired(name, key, event.id)
        if not live:
            self.stale_timers += 1
            logger.info(
                "timer %r of subject %r (event %s) was cancelled or scheduled again before its turn, "
                "or was not fired by krules: it runs nothing",
                key,
                name,
                event.id,
            )
            return
        if event.type == SUBJECT_EXPIRED and key == EXPIRE_KEY:
            await self._expire(event, turn, subject, extra)
        else:
            await self._dispatch(event, turn, subject, extra)
        changes = (subject or turn.subject(name))._pending(None)
        if changes.timers is None:
            changes.timers = {key: Fired(event.id)}
        else:  # a schedule or cancel of the key in this turn forgets the marker itself
            changes.timers.setdefault(key, Fired(event.id))

    async def _expire(
        self, event: Event, turn: Turn, subject: Subject | None, extra: dict[str, Any] | None
    ) -> None:
        """A subject's expiry came (:meth:`Subject.expire`): announce it with the subject's last
        properties, then delete them with the turn.  (An expiry set again after this one came due
        wins: this firing is then not live, see :meth:`_fire`.)"""
        subject = subject or turn.subject(event.subject)
        props = dict(subject._props if subject._props is not None else await subject._load())
        event.data = {"props": props, "ext_props": await subject.get_ext_props()}
        await self._dispatch(event, turn, subject, extra)
        await subject.erase()

    async def fire_due_timers(self, limit: int = 1000) -> int:
        """Embedded mode: run the timers of the storage due by now, each as a root event of its
        subject (in due order per subject); return how many fired.  A storage keeping no timers,
        or whose owner moves them into streams (Redis mode), has none to give."""
        take = getattr(self.storage, "take_due_timers", None)
        if take is None:
            return 0
        due = await take(self._now(), limit)
        if not due:
            return 0
        turns = [asyncio.ensure_future(self.process(timer.event)) for timer in due]
        for timer, outcome in zip(due, await asyncio.gather(*turns, return_exceptions=True), strict=True):
            if isinstance(outcome, BaseException):
                logger.error("timer %r of subject %r failed to fire: %s", timer.key, timer.subject, outcome)
                # Lost, as anything embedded mode fails to store: forget its firing's marker too.
                done = SubjectChanges(timer.subject, timers={timer.key: Fired(timer.event.id)})
                try:
                    await self.storage.store([done])
                except Exception:
                    logger.exception(
                        "forgetting the firing of timer %r of subject %r failed", timer.key, timer.subject
                    )
        return len(due)

    async def run_timers(self, every: float | None = None) -> None:
        """Embedded mode: fire due timers every ``every`` seconds (``KRULES_TIMER_POLL_MS``), until
        cancelled."""
        every = self.settings.timer_poll_ms / 1000 if every is None else every
        while True:
            try:
                while await self.fire_due_timers() and not self._closed:
                    pass
            except Exception:  # a bug must not stop the timers for good
                logger.exception("firing due timers failed; trying again")
            await asyncio.sleep(every)

    async def _run(self, ctx: EventContext, start: int) -> None:
        """Run one handler call whose filters before ``start`` passed (the rest still decide)."""
        rule = ctx.rule
        token = _current.set(ctx)
        try:
            if start == len(rule.filters) or await self._passes(ctx, start):
                await rule.call(ctx)
        except SkipEvent:
            pass
        except Exception as exc:
            await self._handler_failed(ctx, exc)
        finally:
            _current.reset(token)

    async def _handler_failed(self, ctx: EventContext, exc: Exception) -> None:
        """Record and log a failed handler call, then hand it to the middleware's ``on_failure``
        (e.g. to dead-letter a bug of an outer middleware, which no inner middleware saw); what
        they raise is logged."""
        self._failed(ctx, exc, "handler")
        for handle in self.registry.failure_handlers:
            try:
                await handle(ctx, exc)
            except Exception:
                logger.exception(
                    "on_failure of %r raised for %s (event %s)", handle, ctx.handler_name, ctx.event_id
                )

    def _passes_sync(self, ctx: EventContext) -> bool:
        """Apply the leading sync filters of ``ctx.rule``; a raising filter is a recorded failure."""
        rule = ctx.rule
        filters = rule.filters
        try:
            for i in range(rule.sync_filters):
                if not filters[i][0](ctx):
                    return False
        except Exception as exc:
            self._failed(ctx, exc, "filter")
            return False
        return True

    async def _passes(self, ctx: EventContext, start: int) -> bool:
        """Apply ``ctx.rule``'s filters from ``start`` on, awaiting async ones."""
        try:
            for check, is_async in ctx.rule.filters[start:]:
                ok = check(ctx)
                if is_async or (ok.__class__ is not bool and isawaitable(ok)):
                    ok = await ok
                if not ok:
                    return False
        except Exception as exc:
            self._failed(ctx, exc, "filter")
            return False
        return True

    def _failed(self, ctx: EventContext, exc: Exception, where: str) -> None:
        """Record and log a failed handler call; never raises (a broken observer is logged too)."""
        event = ctx._event
        failure = HandlerFailure(ctx.handler_name, event, exc)
        ctx.turn.failures.append(failure)
        if ctx.turn.aborted is None and aborts_turn(exc):
            ctx.turn.aborted = exc  # not the handler's fault: the whole turn is to be taken again
        try:
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
        except Exception:
            logger.exception("reporting the failure of %s raised", ctx.handler_name)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Check the storage is reachable and the transport usable (a one-sentence error otherwise);
        from now on the middleware chain is frozen."""
        self.registry.freeze()
        await self.storage.check()
        if self.transport is not None:
            await self.transport.check()

    async def close(self, *, wait: bool = True) -> None:
        """Wait for running turns (unless ``wait`` is false: a shutdown past its deadline), then release
        the storage (once; later calls do nothing)."""
        if wait:
            await self.settled()
        if not self._closed:
            self._closed = True
            await self.storage.close()
