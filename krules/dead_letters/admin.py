"""The dead letters of a storage, managed: :class:`DeadLetters` lists, gets, deletes, purges and
replays them (what ``krules dlq`` runs), reading the index by time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Final

from krules.dead_letters.record import INDEX_SUBJECT, PREFIX, DeadLetter, _float, _is_name, is_dead_letter
from krules.dead_letters.signing import sign_replay
from krules.errors import DeadLetterError, ReplayInFlightError
from krules.events import Event
from storage.base import DELETE, SubjectChanges, encode

if TYPE_CHECKING:
    from storage.base import SubjectStorage

__all__ = ["DeadLetters", "Send"]

_LOADS_AT_ONCE: Final = 256

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
        return DeadLetter.from_properties(name, props) if is_dead_letter(name, props) else None

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
        them); return the names of those deleted."""
        index = await self.index()
        cutoff = None if older_than is None else self._clock() - older_than
        names = sorted(n for n, at in index.items() if cutoff is None or at < cutoff)
        if cutoff is None:  # everything: index lines naming no dead letter too (written by hand)
            lines, _ = await self.storage.load(INDEX_SUBJECT)
            junk = [name for name in lines if name not in index]
            if junk:
                await self.storage.store([SubjectChanges(INDEX_SUBJECT, dict.fromkeys(junk, DELETE))])
        return await self._delete(names)  # the index lines all; the subjects that are dead letters

    async def delete_many(self, names: Sequence[str]) -> _Names:
        """Delete the dead letters called ``names`` and their index lines; return those deleted."""
        return await self._delete(names)

    async def _delete(self, names: Sequence[str]) -> _Names:
        if not names:
            return []
        # Only real dead letters are deleted (a subject of the user's called dlq-... is left alone);
        # the entries first, then their index lines.
        existed = [record.name for record in await self._load_many(names) if record is not None]
        for start in range(0, len(existed), _LOADS_AT_ONCE):
            await asyncio.gather(*(self.storage.flush(n) for n in existed[start : start + _LOADS_AT_ONCE]))
        await self.storage.store([SubjectChanges(INDEX_SUBJECT, dict.fromkeys(names, DELETE))])
        return existed

    async def replay(
        self, ident: str, send: Send, *, replay_key: str | None = None, force: bool = False
    ) -> tuple[DeadLetter, Event]:
        """Send dead letter ``ident``'s event again (see :mod:`krules.dead_letters`); return the dead letter
        (with its new replay count) and the event sent.  DeadLetterError when it cannot be replayed.

        Idempotent: the replay is claimed first, by raising the stored ``replays`` count from the
        one read to the next in one atomic update that refuses while a replay is in flight (sent,
        and neither succeeded nor failed yet) or once the dead letter is gone.  So two replays of
        one dead letter at once send one event (the other raises ReplayInFlightError), and a
        replay's id, ``<event id>.replay-<n>``, is never sent for two claims.  ``force`` sends
        another while one is in flight (both may then run the handler).

        ``replay_key``: the deployment's, to sign a replay sent through a partition stream (the
        worker runs no unsigned replay, :mod:`krules.dead_letters.signing`); not needed when
        ``send`` hands the event to an engine in this process."""
        record = await self.find(ident)
        record.original_event()  # refuse before counting a replay that cannot happen
        seen_failed = record.replays_failed

        def claim(sent: object) -> int:
            if not isinstance(sent, int) or isinstance(sent, bool):
                raise _Gone  # deleted meanwhile (a replay succeeded, a purge): nothing to replay
            if sent > seen_failed and not force:
                raise ReplayInFlightError(
                    f"Dead letter {record.name!r} has replay {sent} in flight (event "
                    f"{record.event_id}.replay-{sent}); it is deleted when that succeeds and updated "
                    "when it fails, so no other is sent ('krules dlq replay --force' sends one anyway).",
                    record.event_id,
                    sent,
                )
            return sent + 1

        try:
            number, _, _ = await self.storage.update(record.name, "replays", claim)
        except _Gone:
            raise DeadLetterError(
                f"Dead letter {record.name!r} was deleted while it was being replayed (a replay of it "
                "succeeded, or it was purged); nothing was sent."
            ) from None
        now = self._clock()
        await self.storage.set(record.name, "replayed_at", encode(now))
        record = replace(record, replays=number, replayed_at=now)
        event = record.replay_event(number)
        if replay_key is not None and record.handler:
            sign_replay(replay_key, event)
        await send([event])
        if not record.handler:  # sent to every handler as a plain event: this entry is done
            await self.delete(record.name)
        return record, event


class _Gone(Exception):
    """The dead letter being claimed for a replay is no longer stored."""
