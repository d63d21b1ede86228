"""The middleware chain: its contract, and how a handler's chain is composed (a core concept: rules
compose their chains here; the built-in middleware live in the ``middleware`` package).

A middleware is ``async def mw(ctx, next)``: it wraps **one handler call**, may look at or annotate
``ctx`` and decides whether and when to ``await next()``.  The chain for a handler is composed once
per rule (at its first call, so that marks decorators leave on the handler are all in place; never
per call): the first middleware registered is the outermost, and everything runs in the handler's
own task, so context variables and tracing spans set by an outer middleware are visible inside.

A middleware that only acts on some rules (the retry middleware on rules marked ``@retry``) may
define ``applies_to(rule) -> bool``: the chain of a rule it does not apply to leaves it out, so it
costs those rules nothing.  It must still pass such calls through when called (a chain composed by
hand may include it).

Raising :class:`SkipEvent` from a middleware (or handler) ends that handler call quietly: it is not
a failure.  Raising :class:`DeadLetterEvent` fails it at once with a reason (a known-bad event, an
open circuit): it is never retried.  Any other exception is a failure of the handler call and is
reported by the engine.

A middleware may also define ``async def on_failure(ctx, error)``: the engine calls it for every
handler call whose exception reached the engine (after logging it), wherever in the chain the
exception came from: an outer middleware's bug, too, which no inner middleware saw.  The
dead-letter middleware uses it so that such a failure is still dead-lettered, never lost.  It is
not called on the hot path (only for failures), and what it raises is logged.

**Observers.**  Most built-in middleware only look at a call: something before it, something after
it, and they never call the rest of the chain twice or decide not to call it (except by raising).
Such a middleware subclasses :class:`Observer` and implements ``enter(ctx) -> state`` and
``exit(ctx, state, error)`` instead of ``__call__`` (which :class:`Observer` provides, so it still
works as an ordinary middleware).  Consecutive observers in a chain are then run in **one** layer,
one coroutine for all of them, exactly as if they were nested: ``enter`` outermost first, the rest
of the chain, then ``exit`` innermost first, each seeing the error the inner part raised (or None)
and the error an inner ``exit`` raised replacing it.

Middleware share what they learn about a call through ``ctx.set_metadata``/``ctx.get_metadata``
under the keys named here (e.g. the retry middleware records :data:`ATTEMPTS`, which the metrics,
logging and dead-letter middleware read).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeGuard, TypeVar

from krules.errors import RuleDefinitionError

if TYPE_CHECKING:
    from krules.context import EventContext
    from krules.rules import Rule

__all__ = [
    "ATTEMPTS",
    "Call",
    "DeadLetterEvent",
    "FailureHandler",
    "Middleware",
    "Next",
    "Observer",
    "SkipEvent",
    "applies",
    "build_chain",
    "mark_handler",
]

F = TypeVar("F", bound=Callable[..., Any])

ATTEMPTS: Final = "krules.attempts"
"""Metadata key: how many times the handler was called for this event (set by the retry middleware)."""

Next = Callable[[], Awaitable[None]]
"""What a middleware awaits to run the rest of the chain (and finally the handler)."""

Call = Callable[["EventContext"], Awaitable[Any]]
"""A handler, or a handler already wrapped in middleware."""

FailureHandler = Callable[["EventContext", Exception], Awaitable[None]]
"""A middleware's ``on_failure(ctx, error)``, called for a handler call that failed."""


class Middleware(Protocol):
    """``async def mw(ctx, next)``."""

    def __call__(self, ctx: EventContext, next: Next, /) -> Awaitable[None]: ...


class SkipEvent(Exception):
    """Raised by a middleware or handler to stop this handler call without counting it as failed."""


class DeadLetterEvent(Exception):
    """Raised by a handler or middleware to dead-letter the event at once, without retrying.

    ``reason`` is a short machine-readable word recorded with the dead letter (``rejected`` by
    default; the circuit breaker uses ``circuit_open``); the message says why in one sentence.
    """

    def __init__(self, message: str, reason: str = "rejected") -> None:
        super().__init__(message)
        self.reason = reason


class Observer:
    """A middleware that acts before and after a call without wrapping it (see the module docstring).

    ``enter(ctx)`` runs before the rest of the chain and returns a state for ``exit`` (it may raise,
    e.g. :class:`DeadLetterEvent`, to stop the call: ``exit`` is then not called for it).
    ``exit(ctx, state, error)`` runs after it, with the exception the rest of the chain raised (any
    :class:`BaseException`, cancellation included) or None; it returns None, or an awaitable to
    await (e.g. to store something when the call failed).  What ``exit`` raises replaces ``error``;
    if it raises nothing, ``error`` goes on unchanged.
    """

    __slots__ = ()

    def enter(self, ctx: EventContext) -> Any:
        """Before the call: return the state ``exit`` gets."""
        return None

    def exit(self, ctx: EventContext, state: Any, error: BaseException | None) -> Awaitable[None] | None:
        """After the call (``error``: what it raised, or None)."""
        return None

    async def __call__(self, ctx: EventContext, next: Next) -> None:
        """As an ordinary middleware: ``enter``, the rest of the chain, ``exit``."""
        state = self.enter(ctx)
        try:
            await next()
        except BaseException as error:
            pending = self.exit(ctx, state, error)
            if pending is not None:
                await pending
            raise
        pending = self.exit(ctx, state, None)
        if pending is not None:
            await pending


def _observed(observers: Sequence[Observer], inner: Call) -> Call:
    # One coroutine for several consecutive observers, with the semantics of nesting them.  The
    # success path is kept short: it is every call's.  An enter left as Observer's is not called.
    enters = tuple(None if type(o).enter is Observer.enter else o.enter for o in observers)
    exits = tuple(o.exit for o in reversed(observers))

    async def call(ctx: EventContext) -> None:
        states: list[Any] = []
        try:
            for enter in enters:
                states.append(None if enter is None else enter(ctx))
            await inner(ctx)
        except BaseException as error:
            replaced = await _unwind(exits, states, ctx, error)
            if replaced is None:
                raise
        else:
            index = len(states)
            for position, exit in enumerate(exits):
                index -= 1
                try:
                    pending = exit(ctx, states[index], None)
                    if pending is not None:
                        await pending
                except BaseException as error:  # a bug of this exit: the outer ones see it
                    replaced = await _unwind(exits[position + 1 :], states[:index], ctx, error)
                    if replaced is None:
                        raise
                    break
            else:
                return
        # Raised here, outside the except blocks, so its __context__ chain stays as _unwind built it.
        raise replaced

    call.__qualname__ = "+".join(type(o).__name__ for o in observers) + ">"
    return call


async def _unwind(
    exits: Sequence[Callable[..., Awaitable[None] | None]],
    states: list[Any],
    ctx: EventContext,
    error: BaseException,
) -> BaseException | None:
    """Call the ``exits`` (innermost first) of the observers whose state is in ``states`` with
    ``error``; return the exception one of them raised instead of it, chained to what it replaced
    (None: ``error`` goes on)."""
    skipped = len(exits) - len(states)  # innermost observers whose enter did not run, or raised
    current = error
    for position, exit in enumerate(exits):
        if position < skipped:
            continue
        try:
            pending = exit(ctx, states[len(exits) - 1 - position], current)
            if pending is not None:
                await pending
        except BaseException as replacing:
            if replacing is not current:
                replacing.__context__ = current
            current = replacing
    return None if current is error else current


def _layer(mw: Middleware, inner: Call) -> Call:
    # A plain function returning the middleware's awaitable: one coroutine per layer, not two.
    def call(ctx: EventContext) -> Awaitable[None]:
        return mw(ctx, partial(inner, ctx))

    call.__qualname__ = f"{getattr(mw, '__qualname__', type(mw).__name__)}>"
    return call


def _attempt(handler: Call) -> Call:
    # Each call of the innermost layer is one attempt of the handler: a middleware that calls next()
    # again (a retry) makes the handler emit the same event ids as the first time.
    def call(ctx: EventContext) -> Awaitable[Any]:
        ctx.emitted = 0
        return handler(ctx)

    return call


def build_chain(middlewares: Sequence[Middleware], handler: Call, rule: Rule | None = None) -> Call:
    """Compose ``middlewares`` around ``handler``; the first in the sequence is the outermost.

    Given the ``rule``, a middleware whose ``applies_to(rule)`` is false is left out.
    """
    if rule is not None:
        middlewares = [mw for mw in middlewares if applies(mw, rule)]
    if not middlewares:
        return handler
    # Observers never run the rest of the chain twice; any other middleware may (a retry).
    call = handler if all(_fusable(mw) for mw in middlewares) else _attempt(handler)
    run: list[Observer] = []  # consecutive observers, innermost first
    for mw in reversed(middlewares):
        if _fusable(mw):
            run.append(mw)
            continue
        if run:
            call = _observed(run[::-1], call)
            run = []
        call = _layer(mw, call)
    if run:
        call = _observed(run[::-1], call)
    return call


def _fusable(mw: Middleware) -> TypeGuard[Observer]:
    # An observer that kept Observer's __call__ (one overriding it is used as ordinary middleware).
    return isinstance(mw, Observer) and type(mw).__call__ is Observer.__call__


def applies(mw: Middleware, rule: Rule) -> bool:
    """Whether ``mw`` acts on calls of ``rule`` (its ``applies_to``; a middleware without one: yes)."""
    applies_to = getattr(mw, "applies_to", None)
    return applies_to is None or bool(applies_to(rule))


def mark_handler(handler: F, attribute: str, value: object, decorator: str) -> F:
    """Set ``attribute`` on ``handler`` (a bound method's function) for a middleware to read, as the
    decorator ``@decorator`` does; RuleDefinitionError when the object takes no attributes."""
    target = getattr(handler, "__func__", handler)  # a bound method keeps its marks on the function
    try:
        setattr(target, attribute, value)
    except (AttributeError, TypeError):
        raise RuleDefinitionError(
            f"@{decorator} cannot mark {handler!r}, which takes no attributes; decorate the 'async def' "
            "handler function itself."
        ) from None
    return handler
