"""Durable timers of subjects: what ``subject.schedule`` makes, and how a timer becomes an event.

A :class:`Timer` is an event waiting for its due time: its type, subject, payload and id are fixed
when it is scheduled, its CloudEvents ``time`` is the due time, and its ``krulestimer`` extension
names its key.  Timers ride in a turn's :class:`~krules.changes.SubjectChanges` (``timers``: key ->
a Timer to schedule, or :data:`CANCEL`), so they are stored, or not, with the turn's writes; a
storage keeps at most one pending timer per (subject, key).  When a timer is due it is handled as
an ordinary root event of its subject (the memory storage hands due timers to the engine; in Redis
mode the partition's owner moves them into the partition's stream).

A due timer's firing is *on its way* until its turn runs: the storage keeps a marker of it
(the memory storage in its bookkeeping, Redis in the partition's ``timers-fired`` hash), a schedule
or a cancel of the key removes the marker, and the engine runs the firing's turn only if the marker
is still its own (:meth:`krules.engine.Engine.process`): a cancel or a reschedule committed before
the firing's turn wins, and an event carrying ``krulestimer`` that no storage fired runs nothing.
The firing's turn ends with a :class:`Fired` change, which removes the marker if it is still its own.

Subject expiry is a timer with the reserved key :data:`EXPIRE_KEY` and type :data:`SUBJECT_EXPIRED`:
the engine announces it with the subject's last properties, then deletes the subject.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from typing import Any, Final

from krules.errors import TimerError
from krules.event_types import SUBJECT_EXPIRED
from krules.events import Event, event_from_dict
from krules.validation import check_json

__all__ = [
    "CANCEL",
    "EXPIRE_KEY",
    "MAX_KEY_LENGTH",
    "SUBJECT_EXPIRED",
    "TIMER_EXTENSION",
    "Fired",
    "Timer",
    "due_time",
    "timer_id",
]

TIMER_EXTENSION: Final = "krulestimer"
"""The CloudEvents extension of a timer's event: the timer's key."""


EXPIRE_KEY: Final = "krules.expire"
"""The reserved timer key of a subject's expiry."""

MAX_KEY_LENGTH: Final = 200
"""The longest timer key, in characters."""


class _Cancel:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CANCEL"


CANCEL: Final = _Cancel()
"""A timer change: remove the pending timer of this key (nothing when there is none)."""


class Fired:
    """A timer change made by the turn of a timer's firing: the firing is over, so forget its
    marker (the storage's note of the firing on its way), but only if the marker is still this
    firing's, not a newer one's.  A schedule or cancel of the key made in the same turn replaces it
    (those remove any marker anyway).  ``event_id`` is the firing's event id; the Redis storage
    names the firing by the stream entry its commit acknowledges instead."""

    __slots__ = ("event_id",)

    def __init__(self, event_id: str) -> None:
        self.event_id = event_id

    def __repr__(self) -> str:
        return f"Fired({self.event_id!r})"


class Timer:
    """A pending timer: the event it becomes when ``due`` (seconds since the epoch) comes."""

    __slots__ = ("_entry", "event")

    def __init__(self, event: Event) -> None:
        self.event = event
        self._entry: str | None = None

    @property
    def key(self) -> str:
        """The timer's key, unique per subject."""
        return str((self.event.extensions or {})[TIMER_EXTENSION])

    @property
    def subject(self) -> str:
        """The subject the timer fires for."""
        return self.event.subject

    @property
    def due(self) -> float:
        """The due time, seconds since the epoch."""
        return self.event.time

    @property
    def due_ms(self) -> int:
        """The due time in whole milliseconds (how a storage orders timers)."""
        return int(self.event.time * 1000)

    @property
    def entry(self) -> str:
        """The event as a stream entry's JSON (what a Redis storage keeps and moves to the stream)."""
        entry = self._entry
        if entry is None:
            entry = self._entry = json.dumps(
                self.event.to_dict(), ensure_ascii=False, separators=(",", ":"), allow_nan=False
            )
        return entry

    def describe(self) -> dict[str, Any]:
        """What ``schedules()`` and ``krules timers list`` show of the timer."""
        return {
            "key": self.key,
            "subject": self.subject,
            "type": self.event.type,
            "due": self.due,
            "payload": self.event.data,
            "id": self.event.id,
        }

    def __repr__(self) -> str:
        return f"Timer({self.event.type!r}, subject={self.subject!r}, key={self.key!r}, due={self.due})"


def timer_id(cause: str, subject: str, key: str) -> str:
    """The id of the event of a timer scheduled while handling event ``cause``: the same when the
    turn is run again, different for another turn (so a rescheduled timer is not a duplicate)."""
    digest = hashlib.blake2b(f"{cause}\0{subject}\0{key}".encode(), digest_size=12).hexdigest()
    return f"t-{digest}"


def due_time(now: float, after: Any, at: Any) -> float:
    """The due time of ``schedule(after=...)`` or ``schedule(at=...)``; TimerError for bad input."""
    if (after is None) == (at is None):
        raise TimerError("A timer needs exactly one of after= (seconds from now) or at= (an aware datetime).")
    if at is not None:
        if not isinstance(at, datetime):
            raise TimerError(f"A timer's at= must be a datetime with a time zone, not {at!r}.")
        if at.tzinfo is None or at.utcoffset() is None:
            raise TimerError(
                f"A timer's at= {at!r} has no time zone; pass an aware datetime, e.g. with tzinfo=UTC."
            )
        return at.timestamp()
    if isinstance(after, bool) or not isinstance(after, int | float) or not math.isfinite(after):
        raise TimerError(f"A timer's after= must be a finite number of seconds, not {after!r}.")
    if after < 0:
        raise TimerError(f"A timer's after= must not be negative, not {after!r}.")
    return now + after


def check_key(key: Any) -> str:
    """A timer key as given, or TimerError (empty, too long, not a string)."""
    if not isinstance(key, str) or not key:
        raise TimerError(f"A timer key must be a non-empty string, not {key!r}.")
    if len(key) > MAX_KEY_LENGTH:
        raise TimerError(
            f"A timer key must be at most {MAX_KEY_LENGTH} characters, not {len(key)} ({key[:40]!r}...)."
        )
    return key


def new_timer(
    event_type: str, subject: str, payload: Any, key: str, due: float, cause: str, source: str
) -> Timer:
    """A timer whose event is checked now (one-sentence TimerError), so a bad one is never stored."""
    if not isinstance(event_type, str) or not event_type:
        raise TimerError(f"A timer's event type must be a non-empty string, not {event_type!r}.")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise TimerError(f"A timer's payload must be a dict (a JSON object), not {payload!r}.")
    try:
        data = check_json(event_type, payload)
    except ValueError as exc:
        raise TimerError(f"Timer {key!r} of subject {subject!r}: {exc}") from None
    event = Event(
        event_type, subject, data, timer_id(cause, subject, key), source, due, 0, None, {TIMER_EXTENSION: key}
    )
    timer = Timer(event)
    try:
        timer.entry  # noqa: B018  # encoded now: a payload that cannot be sent is refused at the call
    except ValueError as exc:
        raise TimerError(f"Timer {key!r} of subject {subject!r} cannot be stored as JSON ({exc}).") from None
    return timer


def timer_from_entry(entry: str) -> Timer:
    """The timer a storage kept as a stream entry's JSON (see :attr:`Timer.entry`)."""
    timer = Timer(event_from_dict(json.loads(entry)))
    timer._entry = entry
    return timer
