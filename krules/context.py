"""What a handler receives: the event, its subject, and a way to emit what follows."""

from __future__ import annotations

from collections.abc import Awaitable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from krules.event_types import SUBJECT_PROPERTY_CHANGED, SUBJECT_PROPERTY_DELETED
from krules.events import TRACEPARENT_EXTENSION, Event, trace_context

if TYPE_CHECKING:
    from cloudevents.core.v1.event import CloudEvent

    from krules.clock import Clock
    from krules.engine import Engine
    from krules.rules import Rule
    from krules.subject import Subject
    from krules.turn import Turn

__all__ = ["EventContext", "current_context"]

_PROPERTY_EVENTS: Final = frozenset({SUBJECT_PROPERTY_CHANGED, SUBJECT_PROPERTY_DELETED})

_current: ContextVar[EventContext | None] = ContextVar("krules_current_context", default=None)


def current_context() -> EventContext | None:
    """The context of the handler running in this task, or None outside handlers."""
    return _current.get()


class EventContext:
    """One handler call's view of an event (each matching handler gets its own context)."""

    __slots__ = (
        "_engine",
        "_event",
        "_metadata",
        "emit_extensions",
        "emitted",
        "event_type",
        "extra",
        "payload",
        "rule",
        "subject",
        "turn",
    )

    def __init__(
        self,
        engine: Engine,
        turn: Turn,
        event: Event,
        subject: Subject,
        rule: Rule,
        extra: dict[str, Any] | None,
    ) -> None:
        self._engine = engine
        self.turn = turn
        self._event = event
        # plain attributes, not properties: nearly every handler reads them
        self.event_type: str = event.type
        """The CloudEvent ``type``."""
        self.payload: dict[str, Any] = event.data
        """The CloudEvent ``data`` (a JSON object)."""
        self.subject = subject
        self.rule = rule
        self.extra = extra
        self._metadata: dict[str, Any] | None = None
        self.emitted = 0
        """Events emitted by this handler call so far (reset for each attempt of a retried call)."""
        self.emit_extensions: dict[str, Any] | None = None
        """CloudEvents extensions every event this handler call emits carries (set by middleware,
        e.g. tracing's ``traceparent``); an extension given to ``emit`` itself wins.  When neither
        names a ``traceparent``, an emitted event carries the handled event's ``traceparent`` and
        ``tracestate`` unchanged, so an instance that records no span keeps its caller's trace."""

    # -- the event ---------------------------------------------------------------------------
    @property
    def event(self) -> CloudEvent:
        """The event as a ``cloudevents`` SDK object (built on demand)."""
        return self._event.to_cloudevent()

    @property
    def raw_event(self) -> Event:
        """The engine's own event object (id, depth, parent)."""
        return self._event

    @property
    def event_id(self) -> str:
        """The CloudEvent ``id``."""
        return self._event.id

    @property
    def property_name(self) -> str | None:
        """For property-changed/-deleted events: which property."""
        return self._event.data.get("property_name") if self._event.type in _PROPERTY_EVENTS else None

    @property
    def old_value(self) -> Any:
        """For property-changed/-deleted events: the value before."""
        return self._event.data.get("old_value") if self._event.type in _PROPERTY_EVENTS else None

    @property
    def new_value(self) -> Any:
        """For property-changed events: the value after."""
        return self._event.data.get("value") if self._event.type in _PROPERTY_EVENTS else None

    @property
    def timer_key(self) -> str | None:
        """For an event a timer fired: the timer's key (``schedule(..., key=)``); None otherwise."""
        extensions = self._event.extensions
        key = extensions.get("krulestimer") if extensions is not None else None  # krules.timers'
        return key if isinstance(key, str) else None

    @property
    def handler_name(self) -> str:
        """Dotted name of the handler this context belongs to."""
        return self.rule.name

    @property
    def clock(self) -> Clock:
        """The engine's clock; ``await ctx.clock.sleep(s)`` is how rules back off (tests fake it)."""
        return self._engine.clock

    # -- metadata shared by middleware and the handler ----------------------------------------
    def get_metadata(self, key: str, default: Any = None) -> Any:
        """Metadata set by middleware, falling back to the event's CloudEvents extensions, then to the
        other keyword arguments its ``emit`` was given (``dispatch_url=``...), as in KRules."""
        if self._metadata is not None and key in self._metadata:
            return self._metadata[key]
        extensions = self._event.extensions
        if extensions is not None and key in extensions:
            return extensions[key]
        local = self._event.local_metadata
        if local is not None and key in local:
            return local[key]
        return default

    def set_metadata(self, key: str, value: Any) -> None:
        """Attach a value for later middleware or the handler (this handler call only)."""
        if self._metadata is None:
            self._metadata = {}
        self._metadata[key] = value

    # -- emitting ----------------------------------------------------------------------------
    def emit(
        self,
        event_type: str,
        payload: dict[str, Any] | None = None,
        subject: Subject | str | None = None,
        **extensions: Any,
    ) -> Awaitable[None]:
        """Emit an event caused by this one (same subject unless given); ``await`` it: handled inline."""
        # Returning the engine's coroutine (instead of awaiting it here) saves a frame per emit.
        return self._engine.emit_child(self, event_type, payload, subject, extensions)

    def child_event(
        self,
        event_type: str,
        subject: str,
        data: dict[str, Any],
        time: float,
        extensions: dict[str, Any] | None,
    ) -> Event:
        """The next event this handler call emits: its id derives from the parent's, the handler and
        the emission order within the call, so re-processing re-emits the same ids."""
        self.emitted = seq = self.emitted + 1
        parent = self._event
        rule = self.rule
        if self.emit_extensions is not None:
            extensions = {**self.emit_extensions, **extensions} if extensions else self.emit_extensions
        if parent.extensions is not None and (extensions is None or TRACEPARENT_EXTENSION not in extensions):
            # No span of ours (tracing off): the caller's trace goes on, unchanged.
            carried = trace_context(parent.extensions)
            if carried is not None:
                extensions = {**carried, **extensions} if extensions else carried
        return Event(
            event_type,
            subject,
            data,
            None,
            self._engine._source,
            time,
            parent.depth + 1,
            parent,
            extensions,
            seq,
            rule.key,
        )

    def __repr__(self) -> str:
        return f"EventContext({self._event!r}, handler={self.handler_name})"
