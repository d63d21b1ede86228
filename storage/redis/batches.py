"""Change batches as calls of the store script (``lua/store.lua``), and what to do with its replies.

Callable updates are compare-and-set: the script writes a partition's changes only if every callable
update's property still holds the JSON the callable saw; otherwise it writes nothing and returns the
current values, :func:`reapply` runs the callables again on them, and only the conflicting partitions
are sent again, at once (the reply carried fresh values; a pause would only make them stale).  Plain
compare-and-set can starve a writer that keeps arriving just after a faster one, so after
:data:`CLAIM_AFTER` losses in a row a writer *claims* the subjects it lost on (a
:data:`CLAIM_LEASE_MS` lease): other callable updates of them wait (:func:`wait_for_claim`) until it
has written.  A random write token recorded with the changes lets a call retried after a lost reply
find that it was applied and not apply the callables twice.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any, Final

from krules.timers import CANCEL, Fired
from storage.base import DELETE, Change, SubjectChanges, Update
from storage.redis._resp_connection import Arg
from storage.redis.commands import text
from storage.redis.keys import (
    CLAIM_FIELD,
    EXTENDED_FIELD_PREFIX,
    PROPERTY_FIELD_PREFIX,
    WRITE_TOKENS_FIELD,
    KeySchema,
    timer_member,
)

__all__ = [
    "ALREADY_COMMITTED",
    "CLAIMED",
    "CLAIM_AFTER",
    "CLAIM_LEASE_MS",
    "CONFLICT",
    "FENCED",
    "STORED",
    "TOKENS_KEPT",
    "TOKEN_BYTES",
    "Group",
    "NamesOf",
    "add_call",
    "by_partition",
    "reapply",
    "store_call",
    "store_header",
    "wait_for_claim",
]

TOKEN_BYTES: Final = 8
TOKENS_KEPT: Final = 16
CLAIM_AFTER: Final = 3  # compare-and-sets lost in a row before a writer claims the subject
CLAIM_LEASE_MS: Final = 250

_CLAIM_BACKOFF: Final = 0.001
_CLAIM_BACKOFF_CAP: Final = 0.05

# The store script's replies.
CONFLICT: Final = 0
STORED: Final = 1
CLAIMED: Final = 2
ALREADY_COMMITTED: Final = 3
FENCED: Final = 4

Group = list[SubjectChanges]
"""The changes of the subjects of one partition: what one store-script call writes."""


def by_partition(keys: KeySchema, batch: Sequence[SubjectChanges]) -> dict[int, Group]:
    """Group the non-empty changes of ``batch`` by the partition of their subject."""
    groups: dict[int, Group] = {}
    for changes in batch:
        if changes:
            groups.setdefault(keys.partition(changes.name), []).append(changes)
    return groups


def store_header(group: str = "", window: int = 0, fence: str = "", calls: int = 1) -> list[Arg]:
    """The arguments of a store-script run before its calls (the layout is in ``lua/store.lua``):
    ``group`` the consumer group of commits ('' for plain stores), ``window`` the dedupe window to
    trim to (0: none), ``fence`` ('' for none) and the number of calls."""
    return [WRITE_TOKENS_FIELD, TOKENS_KEPT, CLAIM_FIELD, group, window, fence, calls]


def add_call(
    keys: KeySchema,
    group: Group,
    token: str,
    lease: int,
    event_id: str,
    entry_id: str,
    call_keys: list[str],
    call_args: list[Arg],
) -> None:
    """Append one store-script call to a run's keys and arguments: the subject hashes of ``group``
    to ``call_keys``, its header (``token``, claim ``lease``, the ``event_id`` and stream
    ``entry_id`` of a commit, '' for a plain store) and changes to ``call_args``.  Without callable
    updates no token nor claim is sent.

    Timer changes (:mod:`krules.timers`) go after the subjects' changes, with the partition's timer
    keys after its subject hashes; the call's subject count is then negative to say so, so that a
    call without timers is laid out (and costs) as before.  A :class:`~krules.timers.Fired` change
    names the firing by ``entry_id`` (the stream entry the call acknowledges, what the mover
    recorded as the firing's marker); in a call with none it has nothing to remove."""
    body: list[Any] = []
    any_checks = False
    timed: list[Any] | None = None
    for changes in group:
        if changes.timers:
            if timed is None:
                timed = []
            for key, change in changes.timers.items():
                member = timer_member(changes.name, key)
                if change is CANCEL:
                    timed += (member, "", "")
                elif isinstance(change, Fired):
                    if entry_id:
                        timed += (member, "=", entry_id)
                else:
                    timed += (member, change.due_ms, change.entry)
        call_keys.append(keys.subject(changes.name))
        checks: list[str] = []
        sets: list[str] = []
        dels: list[str] = []
        for field_prefix, mapping in (
            (PROPERTY_FIELD_PREFIX, changes.props),
            (EXTENDED_FIELD_PREFIX, changes.ext),
        ):
            for prop, change in mapping.items():
                field = field_prefix + prop
                if type(change) is str:
                    sets += (field, change)
                elif change is DELETE:
                    dels.append(field)
                elif isinstance(change, Update):
                    checks += (field, change.expected if change.expected is not None else "")
                    sets += (field, change.value)
        any_checks = any_checks or bool(checks)
        body += (len(checks) // 2, len(sets) // 2, len(dels), *checks, *sets, *dels)
    if not any_checks:
        token, lease = "", 0
    if timed is None:
        call_args += (token, lease, event_id, entry_id, len(group), *body)
        return
    partition = keys.partition(group[0].name)
    call_keys += (keys.timers(partition), keys.timer_records(partition), keys.timers_fired(partition))
    call_args += (token, lease, event_id, entry_id, -len(group), *body, len(timed) // 3, *timed)


def store_call(
    keys: KeySchema, group: Group, token: str, lease: int, fence: str = ""
) -> tuple[list[str], list[Arg]]:
    """The keys and arguments of a store-script run of one plain store (``fence``: see
    :func:`store_header`; its partition's fences hash is then the first key)."""
    call_keys = [keys.fences(keys.partition(group[0].name))] if fence else []
    call_args = store_header(fence=fence)
    add_call(keys, group, token, lease, "", "", call_keys, call_args)
    return call_keys, call_args


def reapply(group: Group, conflicts: list[Any]) -> None:
    """Re-apply the callables the store script reported stale: ``[[index, field, current, ...], ...]``."""
    for conflict in conflicts:
        changes = group[int(conflict[0]) - 1]
        for i in range(1, len(conflict), 2):
            field = text(conflict[i])
            current = text(conflict[i + 1]) if conflict[i + 1] is not None else None
            prop = field[2:]
            mapping: dict[str, Change] = (
                changes.ext if field.startswith(EXTENDED_FIELD_PREFIX) else changes.props
            )
            change = mapping[prop]
            if isinstance(change, Update):
                change.reapply(current, changes.name, prop)


async def wait_for_claim(waits: int) -> None:
    """Pause while another writer's claim blocks a callable update: jittered, exponentially longer."""
    delay = min(_CLAIM_BACKOFF_CAP, _CLAIM_BACKOFF * 2 ** (waits - 1))
    await asyncio.sleep(delay * (0.5 + random.random() / 2))


class NamesOf:
    """The sorted subject names of some store groups, rendered only when a message needs them."""

    __slots__ = ("_groups",)

    def __init__(self, groups: list[Group]) -> None:
        self._groups = groups

    def __repr__(self) -> str:
        return repr(sorted({changes.name for group in self._groups for changes in group}))
