"""Subjects: named, stateful entities whose property changes are events.

One class of about 570 lines, kept whole: the KRules subject API (properties and extended
properties, each with get/set/delete/has) and the subject's timers (``schedule``,
``cancel_schedule``, ``schedules``, ``expire``; what a timer is: :mod:`krules.timers`) share one
cache and one set of pending writes, so timers are stored with the turn's writes.

A subject loads its properties from storage on first use and then serves reads from its cache,
until ``store()`` drops it (at the end of the turn, when called from a handler), as in KRules.
Writes are cached too (the default) and stored together when the turn ends or on ``store()``;
``use_cache=False`` writes go to storage at once, atomically.  ``set`` fires
``subject-property-changed`` inline (handlers run before ``set`` returns) when the value really
changed and the write is not muted; extended properties never fire events.

Callable updates (``set("n", lambda n: (n or 0) + 1)``) are never lost: in cached mode the store is
a compare-and-set against the value the callable saw, and the storage re-applies the callable when
another writer got there first.  A function of no argument (``set("token", lambda: new_token())``)
is called once, as in KRules, and its result is written as a plain value: it does not depend on the
old value, so there is nothing to re-apply, and calling it again on a conflict would make a second
token.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import FunctionType
from typing import TYPE_CHECKING, Any, Final

from krules.changes import DELETE, Change, SubjectChanges, Update, decode, encode
from krules.context import _current
from krules.errors import ConfigurationError, TimerError, TurnEndedError
from krules.event_types import SUBJECT_DELETED, SUBJECT_PROPERTY_CHANGED, SUBJECT_PROPERTY_DELETED
from krules.properties import PayloadConst, PropertyType
from krules.timers import CANCEL, EXPIRE_KEY, SUBJECT_EXPIRED, Timer, check_key, due_time, new_timer

if TYPE_CHECKING:
    from krules.context import EventContext
    from krules.engine import Engine
    from krules.turn import Turn

__all__ = ["PayloadConst", "PropertyType", "Subject"]  # the first two where KRules has them


_CONTAINERS: Final = (list, dict)


def _changed(old: Any, new: Any) -> bool:
    """Whether storing ``new`` over ``old`` changes the stored JSON (so an event must fire)."""
    if type(new) is not type(old):  # 1, 1.0 and True are == in Python but not in JSON
        return True
    if new is old:  # the same list or dict set again: it may have been changed in place
        return type(new) in _CONTAINERS
    if new != old:
        return True
    return type(new) in _CONTAINERS and encode(new) != encode(old)  # [1] == [True]


_STAR_ARGS: Final = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS


def _takes_no_argument(fn: Callable[..., Any]) -> bool:
    """Whether KRules would call ``fn`` without the old value: a plain function of no parameter.

    KRules checks ``inspect.isfunction`` and counts the signature's parameters; the code object
    answers the same without building a signature (only a ``functools.wraps`` wrapper needs one).
    Other callables (partials, bound methods, callable objects) get the old value.
    """
    if type(fn) is not FunctionType:
        return False
    if hasattr(fn, "__wrapped__"):
        return not inspect.signature(fn).parameters
    code = fn.__code__
    return not (code.co_argcount or code.co_kwonlyargcount or code.co_flags & _STAR_ARGS)


def _compose(outer: Callable[[Any], Any], inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: outer(inner(value))


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()


def _engine_of(name: str, engine: Engine | None, storage: Any, event_bus: Any) -> Engine:
    """The engine of KRules' constructor, ``Subject(name, storage=..., event_bus=...)``: the event
    bus is ``container.event_bus()`` (the engine), the storage, if given, that engine's storage."""
    if engine is not None and event_bus is not None and event_bus is not engine:
        raise ConfigurationError(
            f"Subject {name!r} was given two engines; pass engine or event_bus, not both."
        )
    engine = engine if engine is not None else event_bus
    if not (hasattr(engine, "emit_change") and hasattr(engine, "storage")):  # the engine imports us
        raise ConfigurationError(
            f"Subject {name!r} needs the app's engine, not {engine!r}; write container.subject({name!r}) "
            "(or Subject(name, event_bus=container.event_bus()))."
        )
    if storage is not None and storage is not engine.storage:
        raise ConfigurationError(
            f"Subject {name!r} uses its engine's storage, not {storage!r}; override "
            "container.subject_storage and write container.subject(name) instead of passing storage=."
        )
    return engine


class Subject:
    """A named entity with properties (reactive) and extended properties (silent metadata)."""

    __slots__ = ("_changes", "_engine", "_ext", "_props", "_turn", "_use_cache", "name")

    def __init__(
        self,
        name: str,
        engine: Engine | None = None,
        use_cache_default: bool = True,
        *,
        storage: Any = None,
        event_bus: Engine | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"A subject name must be a non-empty string, not {name!r}.")
        if engine is None or event_bus is not None or storage is not None:
            engine = _engine_of(name, engine, storage, event_bus)
        self.name = name
        self._engine = engine
        self._use_cache = use_cache_default
        self._props: dict[str, Any] | None = None
        self._ext: dict[str, Any] = {}
        self._changes: SubjectChanges | None = None
        self._turn: Turn | None = None

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Subject<{self.name}>"

    # -- cache -------------------------------------------------------------------------------
    async def _load(self) -> dict[str, Any]:
        props = self._props
        if props is None:
            loaded, ext = await self._engine.storage.load(self.name)
            props = self._props
            if props is None:  # else a concurrent handler loaded (and maybe wrote) meanwhile: keep that
                props, self._props, self._ext = loaded, loaded, ext
        return props

    def _pending(self, ctx: EventContext | None) -> SubjectChanges:
        if ctx is not None:
            turn = ctx.turn
            if turn.closed:
                raise TurnEndedError(
                    f"Subject {self.name!r} was written after the turn of event {turn.root.id!r} ended; "
                    "write from the handler itself, or emit an event from background work."
                )
            if turn is not self._turn:
                turn.adopt(self)  # stored when that turn ends, wherever the object came from
                self._turn = turn
        changes = self._changes
        if changes is None:
            changes = self._changes = SubjectChanges(self.name)
        return changes

    def take_changes(self) -> SubjectChanges | None:
        """Hand the pending changes over for storing (writes made meanwhile start a new batch)."""
        changes = self._changes
        if not changes:
            return None
        self._changes = None
        return changes

    def restore_changes(self, changes: SubjectChanges) -> None:
        """Put back changes whose store failed, beneath any write made since."""
        newer = self._changes
        if newer is None:
            self._changes = changes
            return
        if changes.timers:
            newer.timers = {**changes.timers, **(newer.timers or {})}
        for older_section, newer_section in ((changes.props, newer.props), (changes.ext, newer.ext)):
            for prop, older in older_section.items():
                change = newer_section.get(prop)
                if change is None:
                    newer_section[prop] = older
                elif type(change) is Update:
                    if type(older) is Update:
                        newer_section[prop] = Update(
                            older.expected, _compose(change.fn, older.fn), change.value
                        )
                    else:  # the newer callable saw an absolute value: its result is absolute too
                        newer_section[prop] = change.value

    @property
    def dirty(self) -> bool:
        """True when cached writes wait to be stored."""
        return bool(self._changes)

    def _cached_write(
        self, values: dict[str, Any], changes: dict[str, Change], prop: str, value: Any
    ) -> tuple[Any, Any]:
        old = values.get(prop, _MISSING)
        pending = changes.get(prop)
        if callable(value):
            if _takes_no_argument(value):  # called once; the result does not depend on ``old``
                new = value()
                changes[prop] = encode(new, self.name, prop)
            else:
                fn: Callable[[Any], Any] = value
                new = fn(None if old is _MISSING else old)
                encoded = encode(new, self.name, prop)
                if pending is None:
                    expected = None if old is _MISSING else encode(old, self.name, prop)
                    changes[prop] = Update(expected, fn, encoded)
                elif type(pending) is Update:
                    changes[prop] = Update(pending.expected, _compose(fn, pending.fn), encoded)
                else:  # after a plain write or a delete the result is absolute
                    changes[prop] = encoded
        else:
            new = value
            changes[prop] = encode(value, self.name, prop)
        values[prop] = new
        return new, old

    def _forget_pending(self, prop: str, ext: bool) -> None:
        if self._changes is not None:
            (self._changes.ext if ext else self._changes.props).pop(prop, None)

    async def _store_pending(self, prop: str, ext: bool) -> None:
        """Store the cached change of one property first, so a direct callable update builds on it."""
        changes = self._changes
        section = None if changes is None else (changes.ext if ext else changes.props)
        if not section or prop not in section:
            return
        change = section.pop(prop)
        single = (
            SubjectChanges(self.name, ext={prop: change})
            if ext
            else SubjectChanges(self.name, {prop: change})
        )
        try:
            await self._engine.storage.store((single,))
        except BaseException:
            self.restore_changes(single)
            raise

    # -- ordinary properties -----------------------------------------------------------------
    async def get(self, prop: str, default: Any = _MISSING, use_cache: bool | None = None) -> Any:
        """Return a property; a missing one raises ``AttributeError`` unless a default is given."""
        if use_cache is False or (use_cache is None and not self._use_cache):
            try:
                value = await self._engine.storage.get(self.name, prop)
            except KeyError:
                if default is _MISSING:
                    raise AttributeError(f"Subject {self.name!r} has no property {prop!r}.") from None
                return default
            if self._props is not None and not (self._changes and prop in self._changes.props):
                self._props[prop] = value
            return value
        props = self._props if self._props is not None else await self._load()
        try:
            return props[prop]
        except KeyError:
            if default is _MISSING:
                raise AttributeError(f"Subject {self.name!r} has no property {prop!r}.") from None
            return default

    async def set(
        self,
        prop: str,
        value: Any,
        muted: bool = False,
        extra: dict[str, Any] | None = None,
        use_cache: bool | None = None,
    ) -> tuple[Any, Any]:
        """Set a property (a value, a callable of the old value, or a function of no argument,
        called once); return ``(new, old)``.

        Fires ``subject-property-changed`` inline when the value changed and ``muted`` is False.
        ``old`` is None when the property did not exist.
        """
        engine = self._engine
        ctx = _current.get()  # engine.handler_context(), inlined: every set pays for it
        if ctx is not None and ctx._engine is not engine:
            ctx = None
        will_emit = not muted
        if will_emit and ctx is not None and ctx._event.depth >= engine._max_depth:
            engine.check_depth(self.name, SUBJECT_PROPERTY_CHANGED, ctx)
        if use_cache is False or (use_cache is None and not self._use_cache):
            storage = self._engine.storage
            if callable(value) and not _takes_no_argument(value):
                await self._store_pending(prop, ext=False)
                new, old, existed = await storage.update(self.name, prop, value)
            else:  # a value, or a function of no argument: called once, its result written as is
                new = value() if callable(value) else value
                existed, old = await storage.set(self.name, prop, encode(new, self.name, prop))
            if self._props is not None:
                self._props[prop] = new
                self._forget_pending(prop, ext=False)
            changed = not existed or _changed(old, new)
        else:
            props = self._props if self._props is not None else await self._load()
            new, old = self._cached_write(props, self._pending(ctx).props, prop, value)
            changed = old is _MISSING or _changed(old, new)
            if old is _MISSING:
                old = None
        if will_emit and changed:
            await self._engine.emit_change(
                self,
                SUBJECT_PROPERTY_CHANGED,
                {"property_name": prop, "old_value": old, "value": new},
                extra,
                ctx,
            )
        return new, old

    async def delete(
        self,
        prop: str,
        muted: bool = False,
        extra: dict[str, Any] | None = None,
        use_cache: bool | None = None,
    ) -> None:
        """Delete a property (``AttributeError`` if missing); fires ``subject-property-deleted``."""
        ctx = self._engine.handler_context()
        if not muted:
            self._engine.check_depth(self.name, SUBJECT_PROPERTY_DELETED, ctx)
        if use_cache is False or (use_cache is None and not self._use_cache):
            existed, old = await self._engine.storage.delete(self.name, prop)
            if not existed:
                raise AttributeError(f"Subject {self.name!r} has no property {prop!r}.")
            if self._props is not None:
                self._props.pop(prop, None)
                self._forget_pending(prop, ext=False)
        else:
            props = self._props if self._props is not None else await self._load()
            if prop not in props:
                raise AttributeError(f"Subject {self.name!r} has no property {prop!r}.")
            old = props.pop(prop)
            self._pending(ctx).props[prop] = DELETE
        if not muted:
            await self._engine.emit_change(
                self, SUBJECT_PROPERTY_DELETED, {"property_name": prop, "old_value": old}, extra, ctx
            )

    async def has(self, prop: str, use_cache: bool | None = None) -> bool:
        """True when the property exists."""
        if use_cache is False or (use_cache is None and not self._use_cache):
            try:
                await self._engine.storage.get(self.name, prop)
            except KeyError:
                return False
            return True
        props = self._props if self._props is not None else await self._load()
        return prop in props

    async def keys(self, use_cache: bool | None = None) -> list[str]:
        """Names of the ordinary properties."""
        if use_cache is False or (use_cache is None and not self._use_cache):
            props, _ = await self._engine.storage.load(self.name)
            return list(props)
        props = self._props if self._props is not None else await self._load()
        return list(props)

    # -- extended properties (never emit) ----------------------------------------------------
    async def get_ext(self, prop: str, default: Any = _MISSING, use_cache: bool | None = None) -> Any:
        """Return an extended property; missing raises ``AttributeError`` unless a default is given."""
        if use_cache is False or (use_cache is None and not self._use_cache):
            try:
                return await self._engine.storage.get(self.name, prop, ext=True)
            except KeyError:
                if default is _MISSING:
                    raise AttributeError(
                        f"Subject {self.name!r} has no extended property {prop!r}."
                    ) from None
                return default
        if self._props is None:
            await self._load()
        try:
            return self._ext[prop]
        except KeyError:
            if default is _MISSING:
                raise AttributeError(f"Subject {self.name!r} has no extended property {prop!r}.") from None
            return default

    async def set_ext(self, prop: str, value: Any, use_cache: bool | None = None) -> tuple[Any, Any]:
        """Set an extended property (a value, a callable of the old value or a function of no
        argument); never emits."""
        if use_cache is False or (use_cache is None and not self._use_cache):
            if callable(value) and not _takes_no_argument(value):
                await self._store_pending(prop, ext=True)
                new, old, _ = await self._engine.storage.update(self.name, prop, value, ext=True)
            else:  # a value, or a function of no argument: called once, its result written as is
                new = value() if callable(value) else value
                _, old = await self._engine.storage.set(
                    self.name, prop, encode(new, self.name, prop), ext=True
                )
            if self._props is not None:
                self._ext[prop] = new
                self._forget_pending(prop, ext=True)
            return new, old
        if self._props is None:
            await self._load()
        new, old = self._cached_write(
            self._ext, self._pending(self._engine.handler_context()).ext, prop, value
        )
        return new, (None if old is _MISSING else old)

    async def delete_ext(self, prop: str, use_cache: bool | None = None) -> None:
        """Delete an extended property (``AttributeError`` if missing); never emits."""
        if use_cache is False or (use_cache is None and not self._use_cache):
            existed, _ = await self._engine.storage.delete(self.name, prop, ext=True)
            if not existed:
                raise AttributeError(f"Subject {self.name!r} has no extended property {prop!r}.")
            if self._props is not None:
                self._ext.pop(prop, None)
                self._forget_pending(prop, ext=True)
            return
        if self._props is None:
            await self._load()
        if prop not in self._ext:
            raise AttributeError(f"Subject {self.name!r} has no extended property {prop!r}.")
        del self._ext[prop]
        self._pending(self._engine.handler_context()).ext[prop] = DELETE

    async def has_ext(self, prop: str, use_cache: bool | None = None) -> bool:
        """True when the extended property exists."""
        if use_cache is False or (use_cache is None and not self._use_cache):
            _, ext = await self._engine.storage.load(self.name)
            return prop in ext
        if self._props is None:
            await self._load()
        return prop in self._ext

    async def get_ext_props(self, use_cache: bool | None = None) -> dict[str, Any]:
        """A copy of all extended properties."""
        if use_cache is False or (use_cache is None and not self._use_cache):
            _, ext = await self._engine.storage.load(self.name)
            return ext
        if self._props is None:
            await self._load()
        return dict(self._ext)

    # -- timers (krules.timers) ----------------------------------------------------------------
    async def schedule(
        self,
        event_type: str,
        after: float | None = None,
        at: Any = None,
        payload: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """Schedule ``event_type`` for this subject ``after`` seconds from now or ``at`` an aware
        datetime, with ``payload``; return what is scheduled.

        ``key`` (default: the event type) is unique per subject: scheduling it again replaces the
        timer.  The timer is stored with the turn (so only if the turn commits); when due, it is an
        ordinary event for this subject, with the extension ``krulestimer`` naming the key
        (``ctx.timer_key``).  Bad input, or no turn to carry it: TimerError, nothing scheduled."""
        key = check_key(event_type if key is None else key)
        if key == EXPIRE_KEY:
            raise TimerError(f"The timer key {key!r} is reserved for expire(); choose another key.")
        return self._schedule(event_type, after, at, payload, key).describe()

    def _schedule(self, event_type: str, after: Any, at: Any, payload: Any, key: str) -> Timer:
        engine = self._engine
        ctx = self._turn_context("scheduled")
        timer = new_timer(
            event_type,
            self.name,
            payload,
            key,
            due_time(engine.clock.now(), after, at),
            ctx.turn.root.id,
            engine._source,
        )
        self._timer_change(ctx, key, timer)
        return timer

    async def cancel_schedule(self, key: str) -> None:
        """Cancel this subject's pending timer ``key`` (nothing when there is none), with the turn."""
        self._timer_change(self._turn_context("cancelled"), check_key(key), CANCEL)

    async def schedules(self) -> list[dict[str, Any]]:
        """This subject's pending timers (with the ones this turn scheduled or cancelled), by due time."""
        listed = self._timer_storage()
        pending = {t.key: t for t in await listed(self.name)}
        changes = self._changes
        if changes is not None and changes.timers:
            for key, change in changes.timers.items():
                if change is CANCEL:
                    pending.pop(key, None)
                else:
                    pending[key] = change
        return [t.describe() for t in sorted(pending.values(), key=lambda t: (t.due, t.key))]

    async def expire(self, after: float | None = None, at: Any = None) -> None:
        """Delete this subject ``after`` seconds from now (or ``at`` an aware datetime), announced by a
        ``subject-expired`` event carrying its last properties; ``expire(None)`` clears the expiry.

        The expiry is a timer stored with the turn: calling ``expire`` again resets it, and writes to
        the subject keep it as it is (call ``expire`` in the rule that writes for a sliding expiry)."""
        if after is None and at is None:
            self._timer_change(self._turn_context("cleared"), EXPIRE_KEY, CANCEL)
            return
        self._schedule(SUBJECT_EXPIRED, after, at, None, EXPIRE_KEY)

    def _turn_context(self, what: str) -> EventContext:
        ctx = self._engine.handler_context()
        if ctx is None:
            raise TimerError(
                f"A timer of subject {self.name!r} can only be {what} by a handler (it is stored with "
                "the handler's turn); emit an event and schedule from its rule."
            )
        self._timer_storage()
        return ctx

    def _timer_storage(self) -> Callable[[str], Any]:
        listed = getattr(self._engine.storage, "timers", None)
        if listed is None:
            raise TimerError(
                f"The subject storage {self._engine.storage!r} keeps no timers; use the memory or the "
                "Redis storage."
            )
        return listed  # type: ignore[no-any-return]

    def _timer_change(self, ctx: EventContext, key: str, change: Any) -> None:
        changes = self._pending(ctx)
        if changes.timers is None:
            changes.timers = {}
        changes.timers[key] = change

    async def erase(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Delete every property and extended property with the turn, firing no event (what expiry
        does after announcing it); return what they were."""
        props = dict(self._props if self._props is not None else await self._load())
        ext = dict(self._ext)
        changes = self._pending(self._engine.handler_context())
        changes.props.update(dict.fromkeys(props, DELETE))
        changes.ext.update(dict.fromkeys(ext, DELETE))
        self._props, self._ext = {}, {}
        return props, ext

    # -- whole subject -----------------------------------------------------------------------
    async def dict(self, use_cache: bool | None = None) -> dict[str, Any]:
        """``{"name": ..., <properties>..., "ext": {<extended properties>}}``."""
        if use_cache is False or (use_cache is None and not self._use_cache):
            props, ext = await self._engine.storage.load(self.name)
        else:
            props = self._props if self._props is not None else await self._load()
            ext = self._ext
        out: dict[str, Any] = {"name": self.name}
        out.update(props)
        out["ext"] = dict(ext)
        return out

    async def store(self) -> None:
        """Write the cached changes now (otherwise they are written when the turn ends), then drop
        the cache, as KRules does: the next read loads what is stored, other writers' values too.
        Timers scheduled in a handler's turn stay pending until the turn commits.

        Inside a handler the turn keeps its view until it ends: its reads stay consistent with what
        it loaded and wrote, and the cache is dropped when the turn ends."""
        changes = self.take_changes()
        ctx = self._engine.handler_context()
        if changes is not None and changes.timers and ctx is not None and not ctx.turn.closed:
            # Timers are the turn's: they are stored when it commits, not before.
            self._pending(ctx).timers = changes.timers
            changes.timers = None
            if not changes:
                changes = None
        if changes is not None:
            try:
                await self._engine.storage.store((changes,))
            except BaseException:
                self.restore_changes(changes)
                raise
            self.stored(changes)
        if ctx is not None and not ctx.turn.closed:
            ctx.turn.reread_after(self)
        elif self._changes is None:  # a write made while storing stays readable until it is stored
            self.forget_cache()

    def forget_cache(self) -> None:
        """Drop the cached values (never unstored writes): the next read loads from storage."""
        if self._changes is None:
            self._props = None
            self._ext = {}

    def stored(self, changes: SubjectChanges) -> None:
        """Called after ``changes`` were written: cache what the storage really wrote for callables."""
        props = self._props
        if props is None:
            return
        newer = self._changes
        for values, section, pending in (
            (props, changes.props, newer.props if newer is not None else None),
            (self._ext, changes.ext, newer.ext if newer is not None else None),
        ):
            for prop, change in section.items():
                if type(change) is Update and not (pending and prop in pending):
                    values[prop] = decode(change.value)

    def reload(self) -> None:
        """Drop the cache (and any unstored writes): the next read loads from storage."""
        self._props = None
        self._ext = {}
        self._changes = None

    async def flush(self) -> Subject:
        """Delete the subject: property-deleted for each property, then ``subject-deleted``;
        return the subject (as KRules does, for chaining)."""
        props = dict(self._props if self._props is not None else await self._load())
        ext = dict(self._ext)
        ctx = self._engine.handler_context()
        self._engine.check_depth(self.name, SUBJECT_DELETED, ctx)
        await self._engine.storage.flush(self.name)
        self._props, self._ext, self._changes = {}, {}, None
        for prop, value in props.items():
            await self._engine.emit_change(
                self, SUBJECT_PROPERTY_DELETED, {"property_name": prop, "old_value": value}, None, ctx
            )
        await self._engine.emit_change(self, SUBJECT_DELETED, {"props": props, "ext_props": ext}, None, ctx)
        return self
