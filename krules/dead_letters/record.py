"""The dead-letter record: :class:`DeadLetter`, its subject names and ids, its reasons, and how
failed events and errors are made storable.

Plain data, no storage access; what each field holds is described in :mod:`krules.dead_letters`.
"""

from __future__ import annotations

import hashlib
import math
import re
import traceback as _traceback
from dataclasses import dataclass
from typing import Any, Final

from krules.errors import DeadLetterError, EventFormatError
from krules.events import (
    DEAD_LETTER_EXTENSION,
    REPLAY_EXTENSION,
    REPLAY_SIGNATURE_EXTENSION,
    Event,
    event_from_dict,
)
from krules.rules import NO_HANDLER as _NO_HANDLER
from krules.validation import RESERVED_PREFIX
from storage.base import encode

__all__ = [
    "CIRCUIT_OPEN",
    "ERROR",
    "HANDLER_FAILED",
    "INDEX_SUBJECT",
    "INVALID_EVENT",
    "LOOP_GUARD",
    "MAX_DELIVERIES",
    "MISROUTED",
    "NO_HANDLER",
    "PREFIX",
    "REJECTED",
    "RESERVED_EXTENSION",
    "TIMEOUT",
    "DeadLetter",
    "dead_letter_name",
    "describe_error",
    "format_traceback",
    "is_dead_letter",
]

PREFIX: Final = "dlq-"
"""Every dead letter's subject name starts with this."""
INDEX_SUBJECT: Final = "dlq-index"
"""The subject indexing the dead letters by time (one property per dead letter: its failed_at)."""
HANDLER_FAILED: Final = "error.handler_failed"
"""The event the dead-letter middleware emits for each dead-lettered handler call."""

ERROR: Final = "error"
TIMEOUT: Final = "timeout"
CIRCUIT_OPEN: Final = "circuit_open"
LOOP_GUARD: Final = "loop_guard"
REJECTED: Final = "rejected"
INVALID_EVENT: Final = "invalid_event"
MAX_DELIVERIES: Final = "max_deliveries"
MISROUTED: Final = "misrouted"
RESERVED_EXTENSION: Final = "reserved_extension"
NO_HANDLER: Final = _NO_HANDLER
"""A replay named a handler the instance that ran it has no rule for."""

_MAX_MESSAGE: Final = 4_000
_MAX_TRACEBACK: Final = 32_000


def dead_letter_name(event_id: str, handler_key: str = "") -> str:
    """The subject name of the dead letter of ``event_id`` for the handler keyed ``handler_key``."""
    digest = hashlib.blake2b(f"{event_id}\x1f{handler_key}".encode(), digest_size=8).hexdigest()
    return PREFIX + digest


_NAME: Final = re.compile(r"dlq-[0-9a-f]{16}")
_SHAPE: Final = frozenset({"event", "event_id", "handler", "error", "attempts", "reason", "failed_at"})


def _is_name(name: object) -> bool:
    """Whether ``name`` is one :func:`dead_letter_name` makes (``dlq-`` and 16 hex digits)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def is_dead_letter(name: str, props: dict[str, Any]) -> bool:
    """Whether subject ``name`` with properties ``props`` is a dead letter: a name
    :func:`dead_letter_name` makes and the properties every record is written with (a value edited
    by hand still reads back, :meth:`DeadLetter.from_properties`), so a subject of the user's that
    happens to be called ``dlq-...`` is never listed, replayed or deleted as one."""
    return _is_name(name) and _SHAPE.issubset(props)


def _clip(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    return "..." + text[-limit:] if keep_end else text[:limit] + "..."


def _jsonable(value: Any) -> Any:
    """``value`` with whatever JSON cannot hold replaced by its ``repr`` (so a record always stores)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return repr(value)


_REPLAY_PARTS: Final = (REPLAY_EXTENSION, DEAD_LETTER_EXTENSION, REPLAY_SIGNATURE_EXTENSION)


def _event_dict(event: Event) -> dict[str, Any]:
    out = event.to_dict()
    for name in _REPLAY_PARTS:  # the event as first sent: a replay's own parts are not kept
        out.pop(name, None)
    try:
        encode(out)
    except Exception:  # a child's payload may hold what JSON cannot (emit does not encode it)
        out = _jsonable(out)
    return out


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


@dataclass(slots=True)
class DeadLetter:
    """One dead letter (:mod:`krules.dead_letters` says what each field holds)."""

    name: str
    event: dict[str, Any]
    event_id: str
    event_type: str
    subject: str
    handler: str
    error: dict[str, str]
    traceback: str
    attempts: int
    reason: str
    failed_at: float
    partition: int | None
    entry_id: str = ""
    replays: int = 0
    replayed_at: float | None = None
    replays_failed: int = 0

    @property
    def replay_in_flight(self) -> bool:
        """Whether a replay was sent that has neither succeeded (the dead letter would be gone) nor
        failed (``replays_failed`` would have caught up)."""
        return self.replays > self.replays_failed

    @property
    def id(self) -> str:
        """The name without the ``dlq-`` prefix (what ``krules dlq`` shows and takes)."""
        return self.name[len(PREFIX) :] if self.name.startswith(PREFIX) else self.name

    @property
    def error_line(self) -> str:
        """``Type: message``, first line only."""
        kind, message = self.error.get("type", ""), self.error.get("message", "")
        lines = message.strip().splitlines()
        text = lines[0] if lines else ""
        return f"{kind}: {text}" if kind and text else kind or text

    def properties(self) -> dict[str, Any]:
        """The subject's properties."""
        return {
            "event": self.event,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "subject": self.subject,
            "handler": self.handler,
            "error": self.error,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "reason": self.reason,
            "failed_at": self.failed_at,
            "partition": self.partition,
            "entry_id": self.entry_id,
            "replays": self.replays,
            "replayed_at": self.replayed_at,
            "replays_failed": self.replays_failed,
        }

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "id": ..., <properties>...}``, JSON-ready."""
        return {"name": self.name, "id": self.id, **self.properties()}

    @classmethod
    def from_properties(cls, name: str, props: dict[str, Any]) -> DeadLetter:
        """Read a stored dead letter back, leniently (a property edited by hand gets its default)."""
        error = props.get("error")
        if isinstance(error, dict):
            error = {"type": str(error.get("type", "")), "message": str(error.get("message", ""))}
        else:
            error = {"type": "", "message": "" if error is None else str(error)}
        event = props.get("event")
        partition = props.get("partition")
        replays = _int(props.get("replays"))
        return cls(
            name=name,
            event=event if isinstance(event, dict) else {},
            event_id=str(props.get("event_id", "")),
            event_type=str(props.get("event_type", "")),
            subject=str(props.get("subject", "")),
            handler=str(props.get("handler", "")),
            error=error,
            traceback=str(props.get("traceback", "")),
            attempts=_int(props.get("attempts"), 1),
            reason=str(props.get("reason", "")),
            failed_at=_float(props.get("failed_at")) or 0.0,
            partition=_int(partition) if isinstance(partition, int) else None,
            entry_id=str(props.get("entry_id", "")),
            replays=replays,
            replayed_at=_float(props.get("replayed_at")),
            # an older record has no count: no replay is known to be in flight
            replays_failed=_int(props.get("replays_failed"), replays),
        )

    def original_event(self) -> Event:
        """The failed event, parsed again; DeadLetterError (one sentence) when it is not a valid one."""
        problem = None
        if self.reason == INVALID_EVENT:
            problem = "it holds a stream entry that is not a valid event"
        else:
            try:
                return event_from_dict(self.event)
            except EventFormatError:
                problem = "its stored event is not a valid CloudEvent any more"
        raise DeadLetterError(
            f"Dead letter {self.name!r} cannot be replayed because {problem}; see what was received "
            f"with 'krules dlq show {self.id}', then purge it."
        )

    def replay_event(self, number: int) -> Event:
        """The event that replays this dead letter for the ``number``-th time (:mod:`krules.dead_letters`)."""
        original = self.original_event()
        extensions = {  # no krules* extension of the original (krulesdepth is not one: it is depth)
            k: v for k, v in (original.extensions or {}).items() if not k.startswith(RESERVED_PREFIX)
        }
        if self.handler:
            extensions[REPLAY_EXTENSION] = self.handler
            extensions[DEAD_LETTER_EXTENSION] = self.name
        return Event(
            original.type,
            original.subject,
            original.data,
            f"{original.id}.replay-{number}",
            original.source,
            original.time,
            original.depth,
            None,
            extensions or None,
        )


def describe_error(error: BaseException) -> dict[str, str]:
    """``{"type": ..., "message": ...}`` of an exception (the message clipped to 4,000 characters)."""
    return {"type": type(error).__name__, "message": _clip(str(error), _MAX_MESSAGE)}


def format_traceback(error: BaseException) -> str:
    """The exception's traceback as Python prints it (its last 32,000 characters)."""
    text = "".join(_traceback.format_exception(type(error), error, error.__traceback__))
    return _clip(text, _MAX_TRACEBACK, keep_end=True)
