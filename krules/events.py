"""Events inside the engine, and their CloudEvents form at the boundaries.

Inside one process an event is a small slotted :class:`Event`; it becomes a ``cloudevents`` SDK
object only when it crosses a boundary (HTTP, a stream, a handler asking for ``ctx.event``), so the
hot path never pays for attribute validation or ``datetime`` formatting.

Ids are cheap and deterministic for children: a root event gets ``<instance prefix>-<counter>``; the
n-th event emitted by handler ``h`` while handling event ``P`` gets ``P.id + "." + key(h) + "-" + n``
(hashed when that grows long), where ``key(h)`` is a short hash of the handler's dotted name.  It
does not depend on how concurrent handlers interleave, and a retried handler call counts from 1
again, so re-processing ``P`` re-emits the same ids and a receiver can drop the duplicates.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import time as _time
from datetime import UTC, datetime
from typing import Any, Final

from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.v1.event import CloudEvent

from krules.errors import EventFormatError

__all__ = [
    "DEAD_LETTER_EXTENSION",
    "DEPTH_EXTENSION",
    "REPLAY_EXTENSION",
    "REPLAY_SIGNATURE_EXTENSION",
    "TRACEPARENT_EXTENSION",
    "TRACESTATE_EXTENSION",
    "Event",
    "EventWithMetadata",
    "IdGenerator",
    "event_from_cloudevent",
    "event_from_dict",
    "trace_context",
]

DEPTH_EXTENSION: Final = "krulesdepth"
"""CloudEvents extension attribute carrying the cascade depth of an event."""

REPLAY_EXTENSION: Final = "krulesreplay"
"""CloudEvents extension attribute of a replayed event: the dotted name of the only handler to run
(a dead letter replayed to the handler that failed on it)."""

DEAD_LETTER_EXTENSION: Final = "krulesdlq"
"""CloudEvents extension of a replayed event: the name of the dead letter it replays."""

REPLAY_SIGNATURE_EXTENSION: Final = "krulesreplaysig"
"""CloudEvents extension of a replay sent through a partition stream: its authentication (an HMAC
by the deployment's replay key, :mod:`krules.dead_letters.signing`)."""

TRACEPARENT_EXTENSION: Final = "traceparent"
TRACESTATE_EXTENSION: Final = "tracestate"
"""The CloudEvents distributed-tracing extension (W3C Trace Context), carried by every event."""


def trace_context(extensions: dict[str, Any]) -> dict[str, Any] | None:
    """The ``traceparent``/``tracestate`` of ``extensions`` (None without a ``traceparent``): what the
    events a handler emits inherit from the event it handles when no middleware sets its own."""
    traceparent = extensions.get(TRACEPARENT_EXTENSION)
    if traceparent is None:
        return None
    tracestate = extensions.get(TRACESTATE_EXTENSION)
    if tracestate is None:
        return {TRACEPARENT_EXTENSION: traceparent}
    return {TRACEPARENT_EXTENSION: traceparent, TRACESTATE_EXTENSION: tracestate}


_MAX_ID_LENGTH: Final = 96
_CORE_ATTRIBUTES: Final = frozenset(
    {"id", "source", "type", "subject", "time", "specversion", "datacontenttype", "data", "data_base64"}
)


class IdGenerator:
    """Makes root event ids: a random per-instance prefix plus a counter (no ``uuid4`` per event)."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self, prefix: str | None = None) -> None:
        self._prefix = prefix or secrets.token_hex(6)
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"


def _child_id(parent_id: str, key: str, seq: int) -> str:
    """The id of the ``seq``-th event emitted by handler ``key`` while handling ``parent_id``."""
    event_id = f"{parent_id}.{key}-{seq}" if key else f"{parent_id}.{seq}"
    if len(event_id) > _MAX_ID_LENGTH:
        event_id = hashlib.blake2b(event_id.encode(), digest_size=16).hexdigest()
    return event_id


class Event:
    """One event: CloudEvents attributes, a JSON-object payload, and its place in a cascade."""

    __slots__ = (
        "_id",
        "_key",
        "_seq",
        "data",
        "depth",
        "extensions",
        "parent",
        "source",
        "subject",
        "time",
        "type",
    )
    local_metadata: dict[str, Any] | None = None
    """``emit``'s keywords that do not travel as extensions (:class:`EventWithMetadata`); a class
    attribute here, so the events without any pay nothing for it."""

    def __init__(
        self,
        type: str,
        subject: str,
        data: dict[str, Any],
        id: str | None,
        source: str,
        time: float,
        depth: int = 0,
        parent: Event | None = None,
        extensions: dict[str, Any] | None = None,
        seq: int = 0,
        key: str = "",
    ) -> None:
        self.type = type
        self.subject = subject
        self.data = data
        self._id = id
        self.source = source
        self.time = time
        self.depth = depth
        self.parent = parent
        self.extensions = extensions
        self._seq = seq
        self._key = key

    @property
    def id(self) -> str:
        """The CloudEvent id; a child's is derived from its parent's on first use."""
        event_id = self._id
        if event_id is not None:
            return event_id
        parent = self.parent
        if parent is not None and parent._id is not None:  # the usual case: one step down
            event_id = self._id = _child_id(parent._id, self._key, self._seq)
            return event_id
        # Walk up to the nearest ancestor with an id, then derive downwards: no recursion, however
        # deep the cascade.
        pending: list[Event] = []
        event: Event | None = self
        while event is not None and event._id is None:
            pending.append(event)
            event = event.parent
        if event is None:
            raise RuntimeError("an event without an id must descend from one with an id")
        derived: str = event._id  # type: ignore[assignment]  # the loop stopped at an event with an id
        for event in reversed(pending):
            derived = event._id = _child_id(derived, event._key, event._seq)
        return derived

    def child(
        self,
        type: str,
        subject: str,
        data: dict[str, Any],
        time: float,
        extensions: dict[str, Any] | None,
        seq: int,
        key: str = "",
    ) -> Event:
        """The ``seq``-th event emitted (by the handler keyed ``key``) while handling this one."""
        return Event(type, subject, data, None, self.source, time, self.depth + 1, self, extensions, seq, key)

    def chain(self) -> list[str]:
        """Event types from the root of the cascade down to this event."""
        types: list[str] = []
        event: Event | None = self
        while event is not None:
            types.append(f"{event.type}({event.subject})")
            event = event.parent
        types.reverse()
        return types

    def attributes(self) -> dict[str, Any]:
        """CloudEvents context attributes (no data), with ``time`` as an aware ``datetime``."""
        attributes: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": datetime.fromtimestamp(self.time, UTC),
            "datacontenttype": "application/json",
        }
        if self.extensions:
            attributes.update(self.extensions)
        if self.depth:
            attributes[DEPTH_EXTENSION] = self.depth
        return attributes

    def to_cloudevent(self) -> CloudEvent:
        """This event as a ``cloudevents`` SDK object."""
        return CloudEvent(self.attributes(), self.data)

    def to_dict(self) -> dict[str, Any]:
        """This event in CloudEvents JSON (structured mode) form."""
        out = self.attributes()
        out["time"] = out["time"].isoformat().replace("+00:00", "Z")
        out["data"] = self.data
        return out

    def __repr__(self) -> str:
        return f"Event({self.type!r}, subject={self.subject!r}, id={self.id!r}, depth={self.depth})"


class EventWithMetadata(Event):
    """An event emitted with keyword arguments that stay in this process (``dispatch_url=``...):
    its handlers read them with ``ctx.get_metadata``; they never leave with the event."""

    __slots__ = ("local_metadata",)

    @classmethod
    def of(cls, event: Event, local_metadata: dict[str, Any]) -> EventWithMetadata:
        """``event`` (just built, not yet dispatched) with ``local_metadata``."""
        copy = cls.__new__(cls)
        for name in Event.__slots__:
            setattr(copy, name, getattr(event, name))
        copy.local_metadata = local_metadata
        return copy


def _payload(data: Any, datacontenttype: str | None) -> dict[str, Any]:
    if data is None:
        return {}
    if isinstance(data, (bytes, bytearray, str)):
        if datacontenttype and "json" not in datacontenttype:
            raise EventFormatError(
                f"The event's datacontenttype {datacontenttype!r} is not JSON; "
                "krules payloads are JSON objects."
            )
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise EventFormatError("The event's data is not valid JSON.") from None
    if not isinstance(data, dict):
        raise EventFormatError(
            f"The event's data must be a JSON object, not {type(data).__name__}; wrap the value in an object."
        )
    return data


def _timestamp(value: Any) -> float:
    if value is None:
        return _time.time()
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.timestamp()
    if isinstance(value, str) and "T" in value.upper():
        try:  # Python reads a "Z" itself; a lower-case "z" (also RFC 3339) needs spelling out
            parsed = datetime.fromisoformat(value)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(value.replace("z", "+00:00"))
            except ValueError:
                parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed.timestamp()
    raise EventFormatError(
        f"The event's time {value!r} is not an RFC 3339 timestamp with a time zone "
        "(e.g. 2026-01-31T12:00:00Z)."
    )


def event_from_cloudevent(ce: Any) -> Event:
    """Validate a ``cloudevents`` SDK event and turn it into an :class:`Event`."""
    attributes: dict[str, Any] = dict(ce.get_attributes())
    return _event_from_attributes(attributes, ce.get_data())


def event_from_dict(obj: Any) -> Event:
    """Validate one structured-mode CloudEvent (a decoded JSON object) and turn it into an :class:`Event`."""
    if not isinstance(obj, dict):
        raise EventFormatError(f"A CloudEvent must be a JSON object, not {type(obj).__name__}.")
    attributes = dict(obj)
    data = attributes.pop("data", None)
    if data is None and "data_base64" in attributes:
        raise EventFormatError(
            "The event carries binary data (data_base64); krules payloads are JSON objects."
        )
    event = _event_from_attributes(attributes, data)
    get = attributes.get
    if (
        _PLAIN_ATTRIBUTES.issuperset(attributes)
        and type(get("datacontenttype", "")) is str
        and type(get("traceparent", "")) is str
        and type(get("tracestate", "")) is str
        and type(get("time", "")) is str
    ):  # the checks of _PLAIN_TEXT, spelt out: no generator per event
        # Only attributes checked above, or plain strings: the SDK's checks would add nothing
        # (a partition stream's entries, written by krules, take this path).
        return event
    try:  # the SDK's checks of everything else (extension names, URI attributes...)
        CloudEvent({k: v for k, v in attributes.items() if k != "time"})
    except BaseCloudEventException as exc:
        raise EventFormatError(_sdk_reason(exc)) from None
    return event


_PLAIN_TEXT: Final = ("datacontenttype", "traceparent", "tracestate", "time")
_PLAIN_ATTRIBUTES: Final = frozenset(
    {"specversion", "id", "source", "type", "subject", DEPTH_EXTENSION, *_PLAIN_TEXT}
)


def _sdk_reason(exc: BaseCloudEventException) -> str:
    errors = getattr(exc, "errors", None)
    if errors:
        attribute, problems = next(iter(errors.items()))
        text = (
            f"attribute {attribute!r}: {problems[0]}" if problems else f"attribute {attribute!r} is invalid"
        )
    else:
        text = str(exc) or type(exc).__name__
    return f"The event is not a valid CloudEvent ({text.rstrip('.')})."


def _event_from_attributes(attributes: dict[str, Any], data: Any) -> Event:
    specversion = attributes.get("specversion")
    if specversion != "1.0":
        raise EventFormatError(
            f"The event's specversion is {specversion!r}; krules accepts CloudEvents '1.0'."
        )
    for required in ("id", "source", "type"):
        value = attributes.get(required)
        if not isinstance(value, str) or not value:
            raise EventFormatError(f"The event has no {required!r} attribute; CloudEvents 1.0 requires it.")
    subject = attributes.get("subject")
    if not isinstance(subject, str) or not subject:
        raise EventFormatError(
            "The event has no 'subject' attribute; krules routes every event to a subject."
        )
    depth_value = attributes.get(DEPTH_EXTENSION, 0)
    try:
        depth = int(depth_value)
    except (TypeError, ValueError):
        raise EventFormatError(
            f"The event's {DEPTH_EXTENSION} extension {depth_value!r} is not an integer."
        ) from None
    if depth < 0:
        raise EventFormatError(f"The event's {DEPTH_EXTENSION} extension {depth} is negative.")
    extensions = {
        k: v
        for k, v in attributes.items()
        if k not in _CORE_ATTRIBUTES and k != DEPTH_EXTENSION and v is not None
    }
    return Event(
        type=attributes["type"],
        subject=subject,
        data=_payload(data, attributes.get("datacontenttype")),
        id=attributes["id"],
        source=attributes["source"],
        time=_timestamp(attributes.get("time")),
        depth=depth,
        extensions=extensions or None,
    )
