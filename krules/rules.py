"""The rules registry: ``@on``/``@when``/``@middleware`` and the index that finds matching rules.

Matching never scans every rule.  Rules are indexed by exact event type; glob patterns (``order.*``,
``*``) are kept apart, and the rules for an event type are computed once and memoised, so an emit
costs one dict lookup however many rules do not match (measured: ``docs/performance.md``).
Registering a rule or a middleware clears the memo and re-composes middleware chains; that happens
at import time, never on the hot path.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from fnmatch import translate
from typing import TYPE_CHECKING, Any, Final, TypeVar
from zlib import crc32

from krules.chain import Call, DeadLetterEvent, FailureHandler, Middleware, build_chain
from krules.errors import RuleDefinitionError

if TYPE_CHECKING:
    from krules.context import EventContext

__all__ = ["NO_HANDLER", "Filter", "Rule", "RuleRegistry"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
Filter = Callable[[Any], Any]

_GLOB_CHARS: Final = frozenset("*?[")
_MEMO_LIMIT: Final = 4096
_PENDING_FILTERS: Final = "_krules_pending_filters"
_RULES_ATTR: Final = "_krules_rules"


def _name_of(obj: Any) -> str:
    return str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__)


def _is_async_callable(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    # a callable object counts by its class's __call__ (an ``async def`` method, maybe inherited)
    if inspect.isclass(fn):
        return False
    method = next((c.__dict__["__call__"] for c in type(fn).__mro__ if "__call__" in c.__dict__), None)
    return inspect.iscoroutinefunction(method)


def _chain_on_first_call(rule: Rule, middlewares: list[Middleware]) -> Call:
    """``rule``'s call: the handler itself without middleware, else a stand-in that composes the
    chain at the first call (by then every decorator has marked the handler, whichever order they
    were written in, so ``applies_to`` sees the marks) and replaces itself with it."""
    if not middlewares:
        return rule.handler
    snapshot = tuple(middlewares)

    def first_call(ctx: EventContext) -> Awaitable[Any]:
        if rule.call is first_call:  # not re-composed meanwhile by add_middleware
            rule.call = build_chain(snapshot, rule.handler, rule)
        return rule.call(ctx)

    return first_call


class Rule:
    """One registered handler: its patterns, its filters and its composed middleware chain."""

    __slots__ = ("call", "filters", "handler", "key", "name", "order", "patterns", "sync_filters")

    def __init__(self, handler: Call, patterns: tuple[str, ...], order: int, name: str | None = None) -> None:
        self.handler = handler
        self.name = name or f"{getattr(handler, '__module__', '?')}.{_name_of(handler)}"
        """The handler's dotted name (a stand-in's: the name of the handler it stands in for)."""
        self.key = format(crc32(self.name.encode()) & 0xFFFFFF, "06x")
        """Short stable key of the handler, part of the ids of the events it emits."""
        self.patterns = patterns
        self.order = order
        self.filters: list[tuple[Filter, bool]] = []
        self.sync_filters = 0
        """How many filters at the front are sync (the dispatcher applies those without a task)."""
        self.call: Call = handler

    def add_filters(self, filters: Iterable[Filter], *, first: bool = False) -> None:
        """Add filters (all must pass; async ones are awaited), after the others or before them."""
        added = [(f, _is_async_callable(f)) for f in filters]
        if first:
            self.filters[:0] = added
        else:
            self.filters.extend(added)
        self.sync_filters = next(
            (i for i, (_, is_async) in enumerate(self.filters) if is_async), len(self.filters)
        )

    def __repr__(self) -> str:
        return f"Rule({self.name}, patterns={list(self.patterns)!r})"


NO_HANDLER: Final = "no_handler"
"""The dead-letter reason of a replay to a handler this app has no rule for
(:meth:`RuleRegistry.stand_in`)."""


async def _missing_handler(ctx: EventContext) -> None:
    raise DeadLetterEvent(
        f"Event {ctx.event_id!r} was replayed to handler {ctx.rule.name!r}, which this instance has no "
        f"rule for on {ctx.event_type!r}; load its module here, then replay the dead letter again.",
        reason=NO_HANDLER,
    )


def _check_pattern(pattern: Any) -> str:
    if not isinstance(pattern, str) or not pattern or pattern != pattern.strip() or " " in pattern:
        raise RuleDefinitionError(
            f"@on got the event-type pattern {pattern!r}; use a non-empty string without spaces, "
            "such as 'order.submitted', 'order.*' or '*'."
        )
    if pattern.count("[") != pattern.count("]"):
        raise RuleDefinitionError(f"@on got the event-type pattern {pattern!r} with an unbalanced '[...]'.")
    return pattern


def _check_filters(filters: Sequence[Any]) -> None:
    if not filters:
        raise RuleDefinitionError("@when needs at least one filter: a function of ctx returning a bool.")
    for f in filters:
        if not callable(f):
            raise RuleDefinitionError(
                f"@when got {f!r} ({type(f).__name__}), which is not callable; "
                "pass a function of ctx that returns a bool (sync or async)."
            )


class RuleRegistry:
    """All rules and middleware of one app."""

    def __init__(self) -> None:
        self._rules: list[Rule] = []
        self._exact: dict[str, list[Rule]] = {}
        self._globs: list[tuple[re.Pattern[str], Rule]] = []
        self._middleware: list[Middleware] = []
        self.failure_handlers: tuple[FailureHandler, ...] = ()
        """The ``on_failure`` methods of the middleware that have one, outermost first."""
        self._memo: dict[str, tuple[Rule, ...]] = {}
        self._frozen = False

    # -- registration -----------------------------------------------------------------------
    def on(self, *patterns: str) -> Callable[[F], F]:
        """Decorator: register an ``async def handler(ctx)`` for events matching any pattern."""
        if not patterns:
            raise RuleDefinitionError(
                "@on needs at least one event-type pattern, e.g. @on('order.submitted')."
            )
        checked = tuple(_check_pattern(p) for p in patterns)

        def decorator(handler: F) -> F:
            rule = self.add_rule(handler, checked)
            pending = getattr(handler, _PENDING_FILTERS, None)
            if pending:
                rule.add_filters(pending)
            rules = getattr(handler, _RULES_ATTR, None)
            if rules is None:
                # e.g. a bound method refuses attributes; @when above @on is then unavailable
                with contextlib.suppress(AttributeError):
                    setattr(handler, _RULES_ATTR, [rule])
            else:
                rules.append(rule)
            return handler

        return decorator

    def when(self, *filters: Filter) -> Callable[[F], F]:
        """Decorator: add filters to a handler; works above or below ``@on`` and stacks (ANDed)."""
        _check_filters(filters)

        def decorator(handler: F) -> F:
            rules = getattr(handler, _RULES_ATTR, None)
            if rules:
                for rule in rules:  # applied after @on, yet written above it: runs first
                    rule.add_filters(filters, first=True)
            else:
                pending = getattr(handler, _PENDING_FILTERS, None)
                if pending is None:
                    pending = []
                    setattr(handler, _PENDING_FILTERS, pending)
                # Decorators apply bottom-up: prepend so filters still run top to bottom.
                pending[:0] = filters
            return handler

        return decorator

    def middleware(self, mw: F) -> F:
        """Decorator: add ``async def mw(ctx, next)`` around every handler call (first added is outermost)."""
        self.add_middleware(mw)
        return mw

    def add_rule(self, handler: Callable[..., Any], patterns: Sequence[str]) -> Rule:
        """Register ``handler`` for ``patterns``; reject plain functions with a fix-it message."""
        if not callable(handler):
            raise RuleDefinitionError(f"@on decorates functions; got {handler!r} ({type(handler).__name__}).")
        if not _is_async_callable(handler):
            short = getattr(handler, "__name__", "handler")
            raise RuleDefinitionError(
                f"Handler {_name_of(handler)!r} is not a coroutine function; krules awaits every handler, "
                f"so declare it as 'async def {short}(ctx): ...'."
            )
        rule = Rule(handler, tuple(patterns), len(self._rules))
        rule.call = _chain_on_first_call(rule, self._middleware)
        self._rules.append(rule)
        for pattern in rule.patterns:
            if _GLOB_CHARS.isdisjoint(pattern):
                self._exact.setdefault(pattern, []).append(rule)
            else:
                self._globs.append((re.compile(translate(pattern)), rule))
        self._memo.clear()
        logger.debug("registered %s for %s", rule.name, rule.patterns)
        return rule

    def add_middleware(
        self, mw: Middleware, *, before: Middleware | str | None = None, after: Middleware | str | None = None
    ) -> None:
        """Add a middleware (last, i.e. innermost, unless ``before``/``after`` another one, given as
        the object or its class or function name) and re-compose every rule's chain once.

        Raises RuleDefinitionError once the chain is frozen (the app has started)."""
        if self._frozen:
            raise RuleDefinitionError(
                f"Cannot add middleware {_name_of(mw)!r}: the middleware chain is frozen once the app has "
                "started; add middleware before serving or emitting the first event."
            )
        if not _is_async_callable(mw):
            short = getattr(mw, "__name__", "middleware")
            raise RuleDefinitionError(
                f"Middleware {_name_of(mw)!r} is not a coroutine function; declare it as "
                f"'async def {short}(ctx, next): ... await next()'."
            )
        if before is not None and after is not None:
            raise RuleDefinitionError("Give add_middleware either before= or after=, not both.")
        if before is not None:
            self._middleware.insert(self._position(before), mw)
        elif after is not None:
            self._middleware.insert(self._position(after) + 1, mw)
        else:
            self._middleware.append(mw)
        self.failure_handlers = tuple(
            handler
            for handler in (getattr(m, "on_failure", None) for m in self._middleware)
            if handler is not None
        )
        for rule in self._rules:
            rule.call = _chain_on_first_call(rule, self._middleware)

    def _position(self, ref: Middleware | str) -> int:
        for i, mw in enumerate(self._middleware):
            names = {_name_of(mw), type(mw).__name__, getattr(mw, "__name__", None)}
            if mw is ref or (isinstance(ref, str) and ref in names):
                return i
            if isinstance(ref, type) and isinstance(mw, ref):
                return i
        chain = ", ".join(_name_of(mw) for mw in self._middleware) or "none"
        raise RuleDefinitionError(
            f"Middleware {ref!r} given as before=/after= is not in the chain (it has: {chain})."
        )

    def freeze(self) -> None:
        """Freeze the middleware chain (the engine does it when it starts); rules may still be added."""
        self._frozen = True

    def remove(self, handler: Callable[..., Any]) -> int:
        """Unregister every rule of ``handler``; return how many were removed."""
        keep = [r for r in self._rules if r.handler is not handler]
        removed = len(self._rules) - len(keep)
        if removed:
            self._rebuild(keep)
        return removed

    def clear(self) -> None:
        """Forget every rule (middleware stays)."""
        self._rebuild([])

    def _rebuild(self, rules: list[Rule]) -> None:
        self._rules, self._exact, self._globs = [], {}, []
        self._memo.clear()
        for rule in rules:
            new = self.add_rule(rule.handler, rule.patterns)
            new.add_filters(f for f, _ in rule.filters)

    def stand_in(self, name: str) -> Rule:
        """A rule called ``name`` (registered nowhere) whose call always raises a
        :class:`~krules.chain.DeadLetterEvent` with reason :data:`NO_HANDLER`, in the registered
        middleware chain: what a replay to a handler this app lacks runs, so that it is dead-lettered
        like any failed call (logged, counted, the dead letter rewritten), never silently dropped."""
        rule = Rule(_missing_handler, (), -1, name)
        rule.call = _chain_on_first_call(rule, self._middleware)
        return rule

    # -- lookup ------------------------------------------------------------------------------
    @property
    def rules(self) -> tuple[Rule, ...]:
        """Every registered rule, in registration order."""
        return tuple(self._rules)

    @property
    def memo(self) -> dict[str, tuple[Rule, ...]]:
        """Event type -> matching rules, as computed so far (cleared whenever rules change)."""
        return self._memo

    @property
    def middlewares(self) -> tuple[Middleware, ...]:
        """Registered middleware, outermost first."""
        return tuple(self._middleware)

    def match(self, event_type: str) -> tuple[Rule, ...]:
        """Rules whose patterns match ``event_type``, in registration order (memoised)."""
        try:
            return self._memo[event_type]
        except KeyError:
            pass
        found = {r.order: r for r in self._exact.get(event_type, ())}
        for regex, rule in self._globs:
            if regex.match(event_type):
                found[rule.order] = rule
        result = tuple(found[k] for k in sorted(found))
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()  # unbounded event-type vocabularies must not grow memory forever
        self._memo[event_type] = result
        return result
