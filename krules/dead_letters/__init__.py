"""Dead letters: the handler calls and stream entries that finally failed, kept as subjects.

**What is stored.**  A dead letter is the subject ``dlq-<id>``, inspectable like any subject
(``krules subject show dlq-<id>``), with these properties:

==============  ======================================================================================
``event``       the original CloudEvent as a JSON object (structured mode: attributes, extensions and
                ``data``); for a stream entry that is not a valid event, the entry's raw fields
``event_id``    its ``id``, ``event_type`` its ``type``, ``subject`` its ``subject`` ("" if unknown)
``handler``     the dotted name of the handler that failed; "" for an entry that never reached one
``error``       ``{"type": "ConnectionError", "message": "..."}``
``traceback``   the formatted traceback ("" for stream entries)
``attempts``    calls of the handler (the retry middleware's count), or deliveries of a stream entry
``reason``      for handler calls ``error``, ``timeout``, ``circuit_open``, ``loop_guard``, ``rejected``
                (or another :class:`~middleware.base.DeadLetterEvent` reason); for stream entries
                ``invalid_event``, ``max_deliveries``, ``misrouted``
``failed_at``   epoch seconds of the (latest) failure
``partition``   the partition of the event's subject (of the stream, for an entry that is no event)
``entry_id``    the stream entry id, for the worker's dead letters ("" for handler calls)
``replays``     how many times it was replayed; ``replayed_at`` when last (or None)
==============  ======================================================================================

**Ids.**  ``<id>`` is 16 hex digits of BLAKE2b over the failed event's id and the failing handler's
key (:attr:`krules.rules.Rule.key`); for the worker's dead letters over the event id with no key,
or ``entry:<partition>:<entry id>`` when the entry is not an event.  Deterministic: a turn re-run
after a crash rewrites the same entry instead of adding a second, and two handlers failing on one
event get one entry each.

**The index.**  One subject, ``dlq-index`` (:data:`INDEX_SUBJECT`), has one property per dead letter:
its name, valued with its ``failed_at``.  It is written with the entry, in the same storage batch
(the turn's commit), through the storage protocol only, so it works on every backend.  Costs: a
dead letter adds one field to that one hash (a plain write, no compare-and-set: concurrent turns
never conflict on it); listing reads the whole index in one load (one ``HGETALL`` on Redis, about
40 bytes per dead letter) and then each entry in the time range (one load each, pipelined), with
the filters applied here (there is no range query by time in the protocol).  That stays well under
a second for tens of thousands of dead letters: purge them beyond that.  On Redis the index is one
key in one partition's slot, hot only when failures are.  A sorted set would give O(log n) time
ranges, but on one backend only.  Entries are removed subject first, index line second, so a crash
in between leaves an index line without an entry, which listing skips and purge removes.

**Replays.**  A replay is the original event with a new id, ``<id>.replay-<n>`` (the original id is
in its partition's processed set and would be dropped), the extension ``krulesreplay`` naming the
failed handler (the engine then runs that handler only) and ``krulesdlq`` naming the dead letter.
When the replayed call succeeds, :mod:`middleware.dead_letter` deletes the entry and its index line
in the same turn; when it fails again it rewrites the same entry (new error, traceback and
``failed_at``, the original event kept, ``replays`` at least ``n``).  An entry that never reached a
handler (``max_deliveries``, ``misrouted``) is replayed as a plain event with a new id, to every
handler, and deleted once sent; an ``invalid_event`` entry cannot be replayed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
import traceback as _traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Final

from krules.errors import DeadLetterError, EventFormatError, TurnEndedError
from krules.events import DEAD_LETTER_EXTENSION, REPLAY_EXTENSION, Event, event_from_dict
from krules.partitioning import partition_of
from storage.base import DELETE, Change, SubjectChanges, encode

if TYPE_CHECKING:
    from krules.context import EventContext
    from krules.transport.base import Delivery
    from krules.turn import Turn
    from storage.base import SubjectStorage

__all__ = [
    "CIRCUIT_OPEN",
    "DEAD_LETTER_EXTENSION",
    "ERROR",
    "HANDLER_FAILED",
    "INDEX_SUBJECT",
    "INVALID_EVENT",
    "LOOP_GUARD",
    "MAX_DELIVERIES",
    "MISROUTED",
    "PREFIX",
    "REJECTED",
    "TIMEOUT",
    "DeadLetter",
    "DeadLetters",
    "dead_letter_name",
    "entry_dead_letter",
    "handler_dead_letter",
    "remove_dead_letter",
    "replay_target",
    "store_changes",
    "write_dead_letter",
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

_MAX_MESSAGE: Final = 4_000
_MAX_TRACEBACK: Final = 32_000
_REPLAY_ID: Final = re.compile(r"\.replay-(\d+)$")
_LOADS_AT_ONCE: Final = 256


def dead_letter_name(event_id: str, handler_key: str = "") -> str:
    """The subject name of the dead letter of ``event_id`` for the handler keyed ``handler_key``."""
    digest = hashlib.blake2b(f"{event_id}\x1f{handler_key}".encode(), digest_size=8).hexdigest()
    return PREFIX + digest


def _is_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX) and name != INDEX_SUBJECT


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


def _event_dict(event: Event) -> dict[str, Any]:
    out = event.to_dict()
    out.pop(REPLAY_EXTENSION, None)
    out.pop(DEAD_LETTER_EXTENSION, None)
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
    """One dead letter (see the module docstring for what each field holds)."""

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
            replays=_int(props.get("replays")),
            replayed_at=_float(props.get("replayed_at")),
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
        """The event that replays this dead letter for the ``number``-th time (see the module docstring)."""
        original = self.original_event()
        extensions = {
            k: v
            for k, v in (original.extensions or {}).items()
            if k not in (REPLAY_EXTENSION, DEAD_LETTER_EXTENSION)
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


# -- building records --------------------------------------------------------------------------
def describe_error(error: BaseException) -> dict[str, str]:
    """``{"type": ..., "message": ...}`` of an exception (the message clipped to 4,000 characters)."""
    return {"type": type(error).__name__, "message": _clip(str(error), _MAX_MESSAGE)}


def format_traceback(error: BaseException) -> str:
    """The exception's traceback as Python prints it (its last 32,000 characters)."""
    text = "".join(_traceback.format_exception(type(error), error, error.__traceback__))
    return _clip(text, _MAX_TRACEBACK, keep_end=True)


def replay_target(ctx: EventContext) -> tuple[str, int] | None:
    """``(dead letter name, replay number)`` when ``ctx``'s event is the root of a replay turn."""
    event = ctx.raw_event
    extensions = event.extensions
    if extensions is None or REPLAY_EXTENSION not in extensions or event is not ctx.turn.root:
        return None
    named = extensions.get(DEAD_LETTER_EXTENSION)
    name = named if _is_name(named) else dead_letter_name(event.id, ctx.rule.key)
    match = _REPLAY_ID.search(event.id)
    return str(name), int(match.group(1)) if match else 1


def handler_dead_letter(
    ctx: EventContext,
    error: BaseException,
    reason: str,
    attempts: int,
    failed_at: float,
    name: str | None = None,
) -> DeadLetter:
    """The dead letter of the handler call ``ctx`` that failed with ``error``."""
    event = ctx.raw_event
    return DeadLetter(
        name=name or dead_letter_name(event.id, ctx.rule.key),
        event=_event_dict(event),
        event_id=event.id,
        event_type=event.type,
        subject=event.subject,
        handler=ctx.rule.name,
        error=describe_error(error),
        traceback=format_traceback(error),
        attempts=attempts,
        reason=reason,
        failed_at=failed_at,
        partition=partition_of(event.subject, ctx._engine.settings.partitions),
    )


def _peek(raw: str | None) -> dict[str, Any]:
    """What can be read of an entry's ``event`` field that is not a valid event (for the listing)."""
    try:
        obj = json.loads(raw) if raw is not None else None
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def entry_dead_letter(delivery: Delivery, reason: str, message: str, failed_at: float) -> DeadLetter:
    """The dead letter of a stream entry the worker will not process (``reason``: why)."""
    event = delivery.event
    if event is not None:
        name = dead_letter_name(event.id)
        stored = _event_dict(event)
        event_id, event_type, subject = event.id, event.type, event.subject
        kind = ""
    else:
        name = dead_letter_name(f"entry:{delivery.partition}:{delivery.entry_id}")
        stored = dict(delivery.fields)
        seen = _peek(delivery.fields.get("event"))
        event_id, event_type, subject = (
            v if isinstance(v, str) else "" for v in (seen.get("id"), seen.get("type"), seen.get("subject"))
        )
        kind = EventFormatError.__name__
    return DeadLetter(
        name=name,
        event=stored,
        event_id=event_id,
        event_type=event_type,
        subject=subject,
        handler="",
        error={"type": kind, "message": _clip(message, _MAX_MESSAGE)},
        traceback="",
        attempts=delivery.deliveries,
        reason=reason,
        failed_at=failed_at,
        partition=delivery.partition,
        entry_id=delivery.entry_id,
    )


def store_changes(record: DeadLetter) -> list[SubjectChanges]:
    """The entry and its index line as a storage batch (what the worker commits with the ack)."""
    name = record.name
    props: dict[str, Change] = {k: encode(v, name, k) for k, v in record.properties().items()}
    return [
        SubjectChanges(name, props),
        SubjectChanges(INDEX_SUBJECT, {name: encode(record.failed_at, INDEX_SUBJECT, name)}),
    ]


# -- writing through a turn --------------------------------------------------------------------
def _stage(turn: Turn, name: str, changes: dict[str, Change]) -> None:
    """Add blind writes to a subject of the turn, without loading it (the index can be large)."""
    if turn.closed:
        raise TurnEndedError(
            f"Dead letter index changes were made after the turn of event {turn.root.id!r} ended."
        )
    subject = turn.subject(name)
    pending = subject.take_changes() or SubjectChanges(name)
    pending.props.update(changes)
    subject.restore_changes(pending)


async def write_dead_letter(turn: Turn, record: DeadLetter, *, replay: int = 0) -> DeadLetter:
    """Write ``record`` and its index line through ``turn``'s cached subjects (stored with the turn).

    The entry is rewritten whole; ``replays`` keeps its stored count.  ``replay`` is the number of
    the replay that failed, if it is one: the stored original event is then kept and ``replays`` is
    at least ``replay``.  Returns what was written.
    """
    subject = turn.subject(record.name)
    stored = await subject.dict()
    replays = _int(stored.get("replays"))
    if replay:
        replays = max(replays, replay)
        if isinstance(stored.get("event"), dict):
            record = replace(
                record,
                event=stored["event"],
                event_id=str(stored.get("event_id", record.event_id)),
                event_type=str(stored.get("event_type", record.event_type)),
                subject=str(stored.get("subject", record.subject)),
            )
    record = replace(record, replays=replays, replayed_at=_float(stored.get("replayed_at")))
    for prop, value in record.properties().items():
        await subject.set(prop, value, muted=True)
    _stage(turn, INDEX_SUBJECT, {record.name: encode(record.failed_at, INDEX_SUBJECT, record.name)})
    return record


async def remove_dead_letter(turn: Turn, name: str) -> bool:
    """Delete dead letter ``name`` and its index line through ``turn``; False if it was not stored."""
    subject = turn.subject(name)
    props = await subject.keys()
    for prop in props:
        await subject.delete(prop, muted=True)
    _stage(turn, INDEX_SUBJECT, {name: DELETE})
    return bool(props)


# -- reading and managing ----------------------------------------------------------------------
Send = Callable[[Sequence[Event]], Awaitable[object]]
"""Appends events to their streams (``EventTransport.send``)."""
_Found = list[DeadLetter | None]  # module-level: inside DeadLetters, "list" is the method
_Names = list[str]


@dataclass(slots=True)
class _Filter:
    handler: str | None = None
    event_type: str | None = None
    reason: str | None = None

    def __call__(self, record: DeadLetter) -> bool:
        return (
            (self.handler is None or _matches(record.handler, self.handler))
            and (self.event_type is None or _matches(record.event_type, self.event_type))
            and (self.reason is None or record.reason == self.reason)
        )


def _matches(value: str, pattern: str) -> bool:
    """Exact, or a glob (``rules.orders.*``)."""
    return value == pattern or fnmatchcase(value, pattern)


class DeadLetters:
    """The dead letters of a storage: list, get, delete, purge and replay (what ``krules dlq`` runs).

    ``clock`` returns epoch seconds (``purge`` measures ages with it; ``replayed_at`` records it).
    """

    def __init__(self, storage: SubjectStorage, *, clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self._clock = clock

    async def index(self) -> dict[str, float]:
        """Every indexed dead letter's name and failed_at."""
        props, _ = await self.storage.load(INDEX_SUBJECT)
        index: dict[str, float] = {}
        for name, failed_at in props.items():
            at = _float(failed_at)
            if _is_name(name) and at is not None:
                index[name] = at
        return index

    async def list(
        self,
        *,
        handler: str | None = None,
        event_type: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> Sequence[DeadLetter]:
        """Dead letters, oldest first: failed at or after ``since`` and before ``until`` (epoch
        seconds), of ``handler`` and ``event_type`` (exact names or globs) and ``reason``."""
        index = await self.index()
        names = [
            name
            for name, at in sorted(index.items(), key=lambda item: (item[1], item[0]))
            if (since is None or at >= since) and (until is None or at < until)
        ]
        keep = _Filter(handler, event_type, reason)
        return [record for record in await self._load_many(names) if record is not None and keep(record)]

    async def _load_many(self, names: Sequence[str]) -> _Found:
        found: _Found = []
        for start in range(0, len(names), _LOADS_AT_ONCE):
            chunk = names[start : start + _LOADS_AT_ONCE]
            found += await asyncio.gather(*(self.get(name) for name in chunk))
        return found

    async def get(self, name: str) -> DeadLetter | None:
        """The dead letter called ``name`` (``dlq-...``), or None."""
        props, _ = await self.storage.load(name)
        return DeadLetter.from_properties(name, props) if props and _is_name(name) else None

    async def find(self, ident: str) -> DeadLetter:
        """The dead letter ``ident`` names: its name, its id, or an unambiguous start of its id.

        Raises DeadLetterError (one sentence) when none or several match.
        """
        text = ident.strip()
        name = text if text.startswith(PREFIX) else PREFIX + text
        if len(name) > len(PREFIX) and name != INDEX_SUBJECT:
            record = await self.get(name)
            if record is not None:
                return record
            candidates = sorted(n for n in await self.index() if n.startswith(name))
            if len(candidates) == 1:
                record = await self.get(candidates[0])
                if record is not None:
                    return record
            elif len(candidates) > 1:
                shown = ", ".join(c[len(PREFIX) :] for c in candidates[:5])
                raise DeadLetterError(
                    f"Dead letter id {ident!r} is ambiguous ({len(candidates)} match: {shown}); "
                    "give more of it."
                )
        raise DeadLetterError(
            f"There is no dead letter {ident!r}; 'krules dlq list' shows the ids of those stored."
        )

    async def delete(self, name: str) -> bool:
        """Delete dead letter ``name`` and its index line; False when it was not stored."""
        return bool(await self._delete([name]))

    async def purge(self, older_than: float | None = None) -> _Names:
        """Delete every dead letter that failed more than ``older_than`` seconds ago (None: all of
        them); return their names."""
        index = await self.index()
        cutoff = None if older_than is None else self._clock() - older_than
        names = sorted(n for n, at in index.items() if cutoff is None or at < cutoff)
        await self._delete(names)
        return names

    async def _delete(self, names: Sequence[str]) -> _Names:
        if not names:
            return []
        existed = await self._load_many(names)
        for start in range(0, len(names), _LOADS_AT_ONCE):  # the entries first, then their index lines
            await asyncio.gather(*(self.storage.flush(n) for n in names[start : start + _LOADS_AT_ONCE]))
        await self.storage.store([SubjectChanges(INDEX_SUBJECT, dict.fromkeys(names, DELETE))])
        return [record.name for record in existed if record is not None]

    async def replay(self, ident: str, send: Send) -> tuple[DeadLetter, Event]:
        """Send dead letter ``ident``'s event again (see the module docstring); return the dead letter
        (with its new replay count) and the event sent.  DeadLetterError when it cannot be replayed."""
        record = await self.find(ident)
        record.original_event()  # refuse before counting a replay that cannot happen
        number, _, _ = await self.storage.update(
            record.name, "replays", lambda n: (n if isinstance(n, int) else 0) + 1
        )
        now = self._clock()
        await self.storage.set(record.name, "replayed_at", encode(now))
        record = replace(record, replays=number, replayed_at=now)
        event = record.replay_event(number)
        await send([event])
        if not record.handler:  # sent to every handler as a plain event: this entry is done
            await self.delete(record.name)
        return record, event
