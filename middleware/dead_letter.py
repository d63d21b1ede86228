"""Dead letters: a handler call that finally fails is stored as a dead-letter subject, never lost.

:class:`DeadLetterMiddleware` wraps each handler call.  When the rest of the chain raises anything
but :class:`~middleware.base.SkipEvent` (the last attempt of a retried call, a time-out, an open
circuit, a :class:`~middleware.base.DeadLetterEvent`, the loop guard), it

1. writes the dead letter ``dlq-<id>`` and its index line (:mod:`krules.dead_letters`: the original
   CloudEvent, handler, error, traceback, attempts, reason, time) through the turn's cached
   subjects, so it is stored with the turn (in Redis mode: committed with the event's ack);
2. emits ``error.handler_failed`` for the failed event's subject, a child of the failed event in
   the same turn, with data ``{"dlq", "handler", "reason", "error", "error_type", "event_type",
   "event_id", "subject", "attempts"}`` (rules can alert on it);
3. calls the ``on_dead_letter(handler, reason)`` listeners (e.g.
   ``MetricsMiddleware.record_dead_letter``);
4. re-raises the original exception, so the engine records the failure on the turn as before.

The reason is the :class:`~middleware.base.DeadLetterEvent`'s own (``circuit_open`` for an open
circuit, ``rejected`` by default), ``timeout`` for a time-out (any :class:`TimeoutError`, which
:class:`~middleware.timeout.HandlerTimeoutError` is), ``loop_guard`` for
:class:`~krules.errors.CascadeDepthExceeded`, else ``error``.  Attempts are the retry middleware's
:data:`~middleware.base.ATTEMPTS` (1 without it).

A failure raised *outside* this middleware (a bug of a middleware registered before it) never
passes through it; the engine hands it to :meth:`DeadLetterMiddleware.on_failure`, which
dead-letters it the same way (and logs that it came from outside).  Such a failure may come after
the handler itself succeeded (an outer middleware failing on the way out): replaying it runs the
handler again.

No loops, no lost events: a failure of a handler *of* ``error.handler_failed`` is dead-lettered
but emits nothing more, and an event at the cascade depth limit cannot have a child, so its
``error.handler_failed`` is logged instead of emitted.  A failure of this middleware itself (the
record cannot be written) is logged and the original exception still propagates.

Replays (``krules dlq replay``): the root event of a replay turn runs only the failed handler (a
handler the app lacks is stood in for by a call that raises a ``no_handler``
:class:`~middleware.base.DeadLetterEvent`).  When that call succeeds, its dead letter and index
line are deleted in the same turn; when it fails again, the same dead letter is rewritten (the
original event kept, ``replays`` and ``replays_failed`` counted).

**Bounded.**  ``max_dead_letters`` (``KRULES_MAX_DEAD_LETTERS``; default 10,000 in embedded mode,
where dead letters live in the process's memory, and no limit in Redis mode, where ``krules dlq
purge`` manages them) caps how many are kept: when a new one would pass it, the oldest are deleted
down to nine tenths of it (never the new one), with one WARNING line and the
``on_dropped(count)`` listeners told (``MetricsMiddleware.record_dead_letters_dropped``, the
``krules_dead_letters_dropped_total`` counter).  The middleware counts the dead letters it writes
and reads the index (one load) only when its count reaches the cap, so the check costs a failure
nothing until then; dead letters others write (another instance, the worker) are seen at that read.

Place it outside the circuit breaker, retry and time-out middleware (registered before them), so it
sees only what finally failed::

    [DeadLetterMiddleware(on_dead_letter=metrics.record_dead_letter), CircuitBreakerMiddleware(),
     RetryMiddleware(), TimeoutMiddleware()]
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from krules.config import EnvSettings, integer, setting
from krules.dead_letters.admin import DeadLetters
from krules.dead_letters.record import ERROR, HANDLER_FAILED, LOOP_GUARD, TIMEOUT, DeadLetter
from krules.dead_letters.store import (
    handler_dead_letter,
    remove_dead_letter,
    replay_target,
    write_dead_letter,
)
from krules.errors import CascadeDepthExceeded, ConfigurationError, aborts_turn
from krules.events import REPLAY_EXTENSION
from middleware.base import ATTEMPTS, DeadLetterEvent, Observer, check_listeners, is_failure

if TYPE_CHECKING:
    from krules.context import EventContext
    from middleware.registry import ChainBuild

__all__ = [
    "DEFAULT_EMBEDDED_LIMIT",
    "DeadLetterListener",
    "DeadLetterMiddleware",
    "DeadLetterSettings",
    "DroppedListener",
    "from_settings",
    "reason_of",
]

logger = logging.getLogger(__name__)

DeadLetterListener = Callable[[str, str], object]
"""Called as ``listener(handler, reason)`` for every dead-lettered handler call."""
DroppedListener = Callable[[int], object]
"""Called as ``listener(count)`` when the oldest ``count`` dead letters were deleted to keep the cap."""

DEFAULT_EMBEDDED_LIMIT: Final = 10_000
"""How many dead letters an embedded ``krules run`` keeps (about 3 KB each, plus their payloads)."""

_DEAD_LETTERED: Final = "krules.dead_lettered"
"""Metadata key: this handler call's failure is dead-lettered already."""

_DEPTH_LIMITED: Final = (
    "error.handler_failed for %s on %s (event %s) not emitted: the event is at the cascade depth limit"
)


def reason_of(error: BaseException) -> str:
    """The dead-letter reason of a handler call that failed with ``error``."""
    if isinstance(error, DeadLetterEvent):
        return error.reason
    if isinstance(error, TimeoutError):
        return TIMEOUT
    if isinstance(error, CascadeDepthExceeded):
        return LOOP_GUARD
    return ERROR


def _listeners(value: object) -> list[DeadLetterListener]:
    return check_listeners(
        value,
        owner="DeadLetterMiddleware",
        option="on_dead_letter",
        shape="a plain (not async) function of (handler, reason), or a list of them",
    )


class DeadLetterMiddleware(Observer):
    """Middleware: store what finally fails as a dead letter, announce it, and let it fail.

    ``emit_event`` (default True) emits ``error.handler_failed`` for each dead letter;
    ``on_dead_letter`` is one ``listener(handler, reason)`` or a list of them; ``max_dead_letters``
    (None or 0: no limit) caps how many are kept, the oldest deleted past it, and ``on_dropped``
    listeners are told how many (see the module docstring).
    """

    __slots__ = ("_dropped", "_emit", "_estimate", "_limit", "_listeners", "_trimming", "_written")

    def __init__(
        self,
        *,
        emit_event: bool = True,
        on_dead_letter: DeadLetterListener | Sequence[DeadLetterListener] | None = None,
        max_dead_letters: int | None = None,
        on_dropped: DroppedListener | Sequence[DroppedListener] | None = None,
    ) -> None:
        if not isinstance(emit_event, bool):
            raise ConfigurationError(
                f"DeadLetterMiddleware got emit_event={emit_event!r}; pass True or False."
            )
        if max_dead_letters is not None and (
            isinstance(max_dead_letters, bool)
            or not isinstance(max_dead_letters, int)
            or max_dead_letters < 0
        ):
            raise ConfigurationError(
                f"DeadLetterMiddleware got max_dead_letters={max_dead_letters!r}; pass a number of dead "
                "letters to keep, or None (or 0) for no limit."
            )
        self._emit = emit_event
        self._listeners = _listeners(on_dead_letter)
        self._limit = max_dead_letters or 0
        self._dropped: list[DroppedListener] = check_listeners(
            on_dropped, owner="DeadLetterMiddleware", option="on_dropped", shape="a plain function of (count)"
        )
        self._estimate: int | None = None  # dead letters stored, as far as this middleware knows
        self._written = 0
        self._trimming = False

    @property
    def max_dead_letters(self) -> int | None:
        """The cap on stored dead letters (None: no limit)."""
        return self._limit or None

    def add_listener(self, listener: DeadLetterListener) -> None:
        """Also call ``listener(handler, reason)`` for every dead letter."""
        self._listeners.extend(_listeners(listener))

    def exit(self, ctx: EventContext, state: None, error: BaseException | None) -> Awaitable[None] | None:
        """Dead-letter what the rest of the chain raised (but SkipEvent, a cancellation or a storage
        failure); after a replay's success, delete its dead letter.  The error goes on unchanged."""
        if error is None:
            extensions = ctx.raw_event.extensions
            if extensions is not None and REPLAY_EXTENSION in extensions:  # only a replay's root event
                target = replay_target(ctx)
                if target is not None:
                    return self._replayed(ctx, target[0])
            return None
        if not is_failure(error) or aborts_turn(error):
            return None  # aborts_turn: the storage failing, the whole turn is taken again instead
        ctx.set_metadata(_DEAD_LETTERED, True)
        return self._dead_letter(ctx, error)

    async def on_failure(self, ctx: EventContext, error: Exception) -> None:
        """Dead-letter a failure this middleware did not see: one raised outside it in the chain (a
        bug of an outer middleware), so the event is not lost (the engine calls this)."""
        if ctx.get_metadata(_DEAD_LETTERED) or aborts_turn(error) or not is_failure(error):
            return
        ctx.set_metadata(_DEAD_LETTERED, True)
        logger.warning(
            "the failure of %s on %s (event %s) was raised by middleware outside the dead-letter "
            "middleware; it is dead-lettered all the same",
            ctx.rule.name,
            ctx.event_type,
            ctx.event_id,
        )
        await self._dead_letter(ctx, error)

    async def _dead_letter(self, ctx: EventContext, error: Exception) -> None:
        reason = reason_of(error)
        handler = ctx.rule.name
        record: DeadLetter | None = None
        try:
            attempts = ctx.get_metadata(ATTEMPTS, 1)
            target = replay_target(ctx)
            record = handler_dead_letter(
                ctx,
                error,
                reason,
                attempts if attempts.__class__ is int else 1,
                ctx.clock.now(),
                name=None if target is None else target[0],
            )
            record = await write_dead_letter(ctx.turn, record, replay=0 if target is None else target[1])
            if self._limit:
                await self._bound(ctx, record.name)
        except Exception:
            logger.exception(
                "could not dead-letter the failure of %s on %s (event %s); the failure itself is recorded",
                handler,
                ctx.event_type,
                ctx.event_id,
            )
            record = None
        if self._emit:
            await self._announce(ctx, error, reason, record)
        for listener in self._listeners:
            try:
                listener(handler, reason)
            except Exception:  # a broken listener must not change the outcome of the handler call
                logger.exception("dead-letter listener %r raised", listener)

    async def _announce(
        self, ctx: EventContext, error: Exception, reason: str, record: DeadLetter | None
    ) -> None:
        event = ctx.raw_event
        if event.type == HANDLER_FAILED:
            return  # a handler of the announcement failed: announcing that too could loop
        if event.depth >= ctx._engine.settings.max_cascade_depth:
            logger.warning(_DEPTH_LIMITED, ctx.rule.name, event.type, event.id)
            return
        attempts = ctx.get_metadata(ATTEMPTS, 1)
        payload = {
            "dlq": None if record is None else record.name,
            "handler": ctx.rule.name,
            "reason": reason,
            "error": f"{type(error).__name__}: {error}",
            "error_type": type(error).__name__,
            "event_type": event.type,
            "event_id": event.id,
            "subject": event.subject,
            "attempts": attempts if attempts.__class__ is int else 1,
        }
        try:
            await ctx.emit(HANDLER_FAILED, payload)
        except Exception:
            logger.exception("emitting %s for %s (event %s) failed", HANDLER_FAILED, ctx.rule.name, event.id)

    async def _replayed(self, ctx: EventContext, name: str) -> None:
        try:
            removed = await remove_dead_letter(ctx.turn, name)
        except Exception:
            logger.exception("could not delete dead letter %s after its replay succeeded", name)
            return
        if removed:
            if self._estimate:
                self._estimate -= 1
            logger.info("replay of dead letter %s by %s succeeded; it is deleted", name, ctx.rule.name)

    # -- the cap ---------------------------------------------------------------------------------
    async def _bound(self, ctx: EventContext, name: str) -> None:
        """Count dead letter ``name`` (written by this turn); past the cap, delete the oldest."""
        self._written += 1
        estimate = self._estimate
        if self._trimming or (estimate is not None and estimate < self._limit):
            self._estimate = (estimate or 0) + 1
            return
        self._trimming = True
        try:
            await self._trim(DeadLetters(ctx._engine.storage), name)
        except Exception:  # the dead letter itself is written: only the cap is not kept this time
            logger.exception("could not delete the oldest dead letters to keep %d", self._limit)
        finally:
            self._trimming = False

    async def _trim(self, dead: DeadLetters, name: str) -> None:
        limit, seen = self._limit, self._written
        index = await dead.index()  # what is stored; this turn's dead letter is not yet
        index.pop(name, None)
        count = len(index) + 1
        dropped: list[str] = []
        if count > limit:
            keep = max(1, limit - max(1, limit // 10))  # down to 9/10: the next trim is far off
            oldest = sorted(index, key=lambda n: (index[n], n))[: count - keep]
            dropped = await dead.delete_many(oldest)
            logger.warning(
                "%d dead letters are stored, more than KRULES_MAX_DEAD_LETTERS=%d: deleted the %d oldest "
                "(failed from %s to %s); raise the limit, or replay and purge them sooner",
                count,
                limit,
                len(dropped),
                _when(index[oldest[0]]),
                _when(index[oldest[-1]]),
            )
            for listener in self._dropped:
                try:
                    listener(len(dropped))
                except Exception:
                    logger.exception("dropped-dead-letters listener %r raised", listener)
        self._estimate = count - len(dropped) + (self._written - seen)

    def __repr__(self) -> str:
        return (
            f"DeadLetterMiddleware(emit_event={self._emit}, listeners={len(self._listeners)}, "
            f"max_dead_letters={self.max_dead_letters})"
        )


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _limit(var: str, raw: str) -> int | None:
    text = raw.strip().lower()
    if text in {"", "none", "off"}:
        return 0
    return integer(0)(var, raw)


@dataclass(frozen=True, slots=True)
class DeadLetterSettings(EnvSettings):
    """``KRULES_MAX_DEAD_LETTERS``: how many dead letters ``krules run`` keeps (0 or ``none``: no
    limit; unset: 10,000 embedded, no limit in Redis mode)."""

    max_dead_letters: int | None = setting(None, _limit)


def from_settings(build: ChainBuild) -> DeadLetterMiddleware:
    """The dead-letter middleware ``krules run`` installs, counting its dead letters (and those it
    deletes to keep ``KRULES_MAX_DEAD_LETTERS``) in the metrics."""
    metrics = build.metrics
    limit = DeadLetterSettings.from_env(build.env).max_dead_letters
    if limit is None:
        limit = 0 if build.settings.redis_url else DEFAULT_EMBEDDED_LIMIT
    return DeadLetterMiddleware(
        on_dead_letter=None if metrics is None else metrics.record_dead_letter,
        max_dead_letters=limit,
        on_dropped=None if metrics is None else metrics.record_dead_letters_dropped,
    )
