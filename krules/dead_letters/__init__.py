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
                (or another :class:`~middleware.base.DeadLetterEvent` reason), ``no_handler`` (a
                replay to a handler the instance has no rule for); for stream entries
                ``invalid_event``, ``max_deliveries``, ``misrouted``, ``reserved_extension``
``failed_at``   epoch seconds of the (latest) failure
``partition``   the partition of the event's subject (of the stream, for an entry that is no event)
``entry_id``    the stream entry id, for the worker's dead letters ("" for handler calls)
``replays``     how many times it was replayed; ``replayed_at`` when last (or None);
                ``replays_failed`` how many of those replays failed (fewer: one is in flight)
==============  ======================================================================================

A subject is a dead letter when its name is one :func:`dead_letter_name` makes and it has the
properties every record is written with (:func:`~krules.dead_letters.record.is_dead_letter`): a
user's subject called ``dlq-...`` is never listed, replayed or deleted as one.

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
failed handler (the engine then runs that handler only; one it has no rule for is dead-lettered
with reason ``no_handler``), ``krulesdlq`` naming the dead letter and, through a stream,
``krulesreplaysig`` signing both (:mod:`~krules.dead_letters.signing`: a worker runs no other).
``n`` is claimed atomically from the stored ``replays`` count, and no claim is granted while a
replay is in flight, so replaying one dead letter twice at once sends one event
(:meth:`DeadLetters.replay`).  When the replayed call succeeds, :mod:`middleware.dead_letter`
deletes the entry and its index line in the same turn; when it fails again it rewrites the same
entry (new error, traceback and ``failed_at``, the original event kept, ``replays`` and
``replays_failed`` at least ``n``).  An entry that never reached a
handler (``max_deliveries``, ``misrouted``) is replayed as a plain event with a new id, to every
handler, and deleted once sent; an ``invalid_event`` entry cannot be replayed.

**Modules.**  :mod:`~krules.dead_letters.record` (the record, names, reasons),
:mod:`~krules.dead_letters.store` (writing and removing them with a turn or the worker's ack),
:mod:`~krules.dead_letters.signing` (replay authentication) and :mod:`~krules.dead_letters.admin`
(:class:`DeadLetters`, behind ``krules dlq``).
"""

from krules.dead_letters.admin import DeadLetters
from krules.dead_letters.record import (
    CIRCUIT_OPEN,
    ERROR,
    HANDLER_FAILED,
    INDEX_SUBJECT,
    INVALID_EVENT,
    LOOP_GUARD,
    MAX_DELIVERIES,
    MISROUTED,
    NO_HANDLER,
    PREFIX,
    REJECTED,
    RESERVED_EXTENSION,
    TIMEOUT,
    DeadLetter,
    dead_letter_name,
)
from krules.dead_letters.store import (
    entry_dead_letter,
    handler_dead_letter,
    remove_dead_letter,
    replay_target,
    store_changes,
    write_dead_letter,
)
from krules.events import DEAD_LETTER_EXTENSION

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
    "NO_HANDLER",
    "PREFIX",
    "REJECTED",
    "RESERVED_EXTENSION",
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
