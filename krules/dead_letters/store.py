"""Dead letters written into storage: built from a failed handler call or stream entry, stored
through a turn (the entry and its line in the index, with the turn's own writes) or as a batch the
worker commits with its ack, and removed once a replay succeeds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

from krules.dead_letters.record import (
    _MAX_MESSAGE,
    INDEX_SUBJECT,
    DeadLetter,
    _clip,
    _event_dict,
    _float,
    _int,
    _is_name,
    dead_letter_name,
    describe_error,
    format_traceback,
    is_dead_letter,
)
from krules.decoding import MAX_EVENT_BYTES, SURROGATE
from krules.errors import EventFormatError, TurnEndedError
from krules.events import DEAD_LETTER_EXTENSION, REPLAY_EXTENSION
from krules.partitioning import partition_of
from storage.base import DELETE, Change, SubjectChanges, encode

if TYPE_CHECKING:
    from krules.context import EventContext
    from krules.transport.base import Delivery
    from krules.turn import Turn

__all__ = [
    "entry_dead_letter",
    "handler_dead_letter",
    "remove_dead_letter",
    "replay_target",
    "store_changes",
    "write_dead_letter",
]

_REPLAY_ID: Final = re.compile(r"\.replay-(\d+)$")


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
        partition=partition_of(event.subject, ctx._engine.settings.partition_count),
    )


_MAX_PEEKED: Final = 1_000


def _as_text(value: str | bytes) -> str:
    """``value`` as text a dead letter can store: bytes that are not UTF-8 and lone surrogates are
    written as backslash escapes (``b"\\xff"`` as ``\\xff``, ``"\\ud800"`` as ``\\ud800``)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if value.isascii() or SURROGATE.search(value) is None:
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _stored_fields(fields: Mapping[str, str | bytes]) -> dict[str, str]:
    """An entry's fields as a dead letter keeps them: as text (see :func:`_as_text`), and no more
    than an event may be in all (``MAX_EVENT_BYTES`` characters; the rest cut, marked ``...``)."""
    stored: dict[str, str] = {}
    room = MAX_EVENT_BYTES
    for name, value in fields.items():
        if room <= 0:
            stored["..."] = f"{len(fields) - len(stored)} more field(s) not kept"
            break
        key, text = _clip(_as_text(name), 200), _as_text(value)
        stored[key] = _clip(text, room)
        room -= len(key) + len(text)
    return stored


def _peek(raw: str | bytes | None) -> dict[str, Any]:
    """What can be read of an entry's ``event`` field that is not a valid event (for the listing)."""
    if raw is None or len(raw) > MAX_EVENT_BYTES:
        return {}
    try:
        obj = json.loads(raw)
    except Exception:  # whatever the field holds (even JSON nested too deep to parse)
        return {}
    return obj if isinstance(obj, dict) else {}


def entry_dead_letter(
    delivery: Delivery, reason: str, message: str, failed_at: float, error: BaseException | None = None
) -> DeadLetter:
    """The dead letter of a stream entry the worker will not process (``reason``: why; ``error``:
    the exception it last failed with, if any).  An entry that is not a valid event keeps its fields
    as received (as text, see :func:`_stored_fields`)."""
    event = delivery.event
    if event is not None:
        name = dead_letter_name(event.id)
        stored: dict[str, Any] = _event_dict(event)
        event_id, event_type, subject = event.id, event.type, event.subject
        kind = ""
    else:
        name = dead_letter_name(f"entry:{delivery.partition}:{delivery.entry_id}")
        stored = _stored_fields(delivery.fields)
        seen = _peek(delivery.fields.get("event"))
        event_id, event_type, subject = (
            _clip(_as_text(v), _MAX_PEEKED) if isinstance(v, str) else ""
            for v in (seen.get("id"), seen.get("type"), seen.get("subject"))
        )
        kind = EventFormatError.__name__
    message = _as_text(message)
    return DeadLetter(
        name=name,
        event=stored,
        event_id=event_id,
        event_type=event_type,
        subject=subject,
        handler="",
        error={
            "type": type(error).__name__ if error is not None else kind,
            "message": _clip(message, _MAX_MESSAGE),
        },
        traceback=_as_text(format_traceback(error)) if error is not None else "",
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
    the replay that failed, if it is one: the stored original event is then kept, and ``replays``
    and ``replays_failed`` are at least ``replay`` (the replay is over).  Returns what was written.
    """
    subject = turn.subject(record.name)
    stored = await subject.dict()
    replays = _int(stored.get("replays"))
    replays_failed = _int(stored.get("replays_failed"), replays)
    if replay:
        replays = max(replays, replay)
        replays_failed = max(replays_failed, replay)  # that replay is over: another may be sent
        if isinstance(stored.get("event"), dict):
            record = replace(
                record,
                event=stored["event"],
                event_id=str(stored.get("event_id", record.event_id)),
                event_type=str(stored.get("event_type", record.event_type)),
                subject=str(stored.get("subject", record.subject)),
            )
    record = replace(
        record,
        replays=replays,
        replays_failed=replays_failed,
        replayed_at=_float(stored.get("replayed_at")),
    )
    for prop, value in record.properties().items():
        await subject.set(prop, value, muted=True)
    _stage(turn, INDEX_SUBJECT, {record.name: encode(record.failed_at, INDEX_SUBJECT, record.name)})
    return record


async def remove_dead_letter(turn: Turn, name: str) -> bool:
    """Delete dead letter ``name`` and its index line through ``turn``; False if it was not stored
    (or ``name`` is not a dead letter: a subject of the user's called ``dlq-...`` is left alone)."""
    subject = turn.subject(name)
    props = await subject.keys()
    if props and not is_dead_letter(name, dict.fromkeys(props)):
        return False
    for prop in props:
        await subject.delete(prop, muted=True)
    _stage(turn, INDEX_SUBJECT, {name: DELETE})
    return bool(props)
