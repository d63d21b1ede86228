"""In-process subject storage: the embedded default.

Values are kept as JSON strings, exactly as the Redis backend keeps them, so a rule behaves the same
on both (tuples come back as lists, a set is refused when written).  Every method body runs without
awaiting in between reads and writes, which makes each call atomic on the event loop; callable
updates re-apply on the stored value, so none is lost to a concurrent turn.  Nothing survives the
process: embedded mode is at-most-once on a crash.

Timers (:mod:`krules.timers`) are kept here too, per subject and key, with a heap by due time
from which :meth:`MemoryStorage.take_due_timers` hands the due ones to the engine.  Each timer
handed over stays *fired* (its event id noted per subject and key) until its turn ends; a schedule
or a cancel of the key made meanwhile forgets it, and :meth:`MemoryStorage.timer_live` tells the
engine, so that such a firing runs nothing.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from typing import Any

from krules.timers import CANCEL, Fired, Timer
from storage.base import DELETE, Change, SubjectChanges, Update, decode, encode

__all__ = ["MemoryStorage", "create_memory_storage"]

_Maps = tuple[dict[str, str], dict[str, str]]
_NO_MAPS: _Maps = ({}, {})  # what a missing subject holds; only ever read


class MemoryStorage:
    """A dict of subjects, each a pair of ``{property: json}`` maps (ordinary, extended)."""

    def __init__(self) -> None:
        self._subjects: dict[str, _Maps] = {}
        self._timers: dict[str, dict[str, Timer]] = {}  # subject -> key -> pending timer
        # (due, order, timer): a replaced or cancelled timer stays here until it comes up, skipped
        self._due: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        # (subject, key) -> the event id of the timer handed over and whose turn has not ended
        self._fired: dict[tuple[str, str], str] = {}

    async def load(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        maps = self._subjects.get(name)
        if maps is None:
            return {}, {}
        props, ext = maps
        return (
            {k: decode(v) for k, v in props.items()},
            {k: decode(v) for k, v in ext.items()} if ext else {},
        )

    async def store(self, batch: Sequence[SubjectChanges]) -> None:
        # Resolve every conflicting update before touching anything, so an encoding error in a
        # re-applied callable leaves the whole batch unapplied.
        for changes in batch:
            props, ext = self._subjects.get(changes.name, _NO_MAPS)
            if changes.props:
                self._resolve(changes.name, changes.props, props)
            if changes.ext:
                self._resolve(changes.name, changes.ext, ext)
        for changes in batch:
            maps = self._subjects.get(changes.name)
            if maps is None:
                maps = self._subjects[changes.name] = ({}, {})
            if changes.props:
                self._apply(changes.props, maps[0])
            if changes.ext:
                self._apply(changes.ext, maps[1])
            if not maps[0] and not maps[1]:
                del self._subjects[changes.name]
            if changes.timers:
                self._store_timers(changes.name, changes.timers)

    def _store_timers(self, name: str, changes: dict[str, Any]) -> None:
        pending = self._timers.setdefault(name, {})
        fired = self._fired
        for key, change in changes.items():
            if isinstance(change, Fired):
                if fired.get((name, key)) == change.event_id:
                    del fired[name, key]
                continue
            if fired:
                fired.pop((name, key), None)  # a firing on its way is stale now
            if change is CANCEL:
                pending.pop(key, None)
            else:
                pending[key] = change
                heapq.heappush(self._due, (change.due, next(self._order), change))
        if not pending:
            del self._timers[name]
        if len(self._due) > 64 and len(self._due) > 2 * sum(map(len, self._timers.values())):
            # Mostly replaced or cancelled timers: rebuild, so the heap stays bounded by the pending ones.
            self._due = [entry for entry in self._due if self._pending(entry[2])]
            heapq.heapify(self._due)

    def _pending(self, timer: Timer) -> bool:
        return self._timers.get(timer.subject, {}).get(timer.key) is timer

    async def timers(self, name: str) -> list[Timer]:
        """The pending timers of subject ``name``."""
        return list(self._timers.get(name, {}).values())

    async def all_timers(self) -> list[Timer]:
        """Every pending timer, by due time."""
        return sorted((t for p in self._timers.values() for t in p.values()), key=lambda t: t.due)

    async def timer_live(self, name: str, key: str, event_id: str) -> bool:
        """Whether event ``event_id`` is the firing of subject ``name``'s timer ``key`` handed over by
        :meth:`take_due_timers` and neither cancelled nor scheduled again since."""
        return self._fired.get((name, key)) == event_id

    async def take_due_timers(self, now: float, limit: int = 1000) -> list[Timer]:
        """Remove and return up to ``limit`` timers due by ``now``, in due order, each noted as fired
        until its turn ends (:meth:`timer_live`)."""
        due: list[Timer] = []
        heap = self._due
        while heap and heap[0][0] <= now and len(due) < limit:
            timer = heapq.heappop(heap)[2]
            if self._pending(timer):
                pending = self._timers[timer.subject]
                del pending[timer.key]
                if not pending:
                    del self._timers[timer.subject]
                self._fired[timer.subject, timer.key] = timer.event.id
                due.append(timer)
        return due

    def next_due(self) -> float | None:
        """The due time of the next pending timer (None: none)."""
        heap = self._due
        while heap and not self._pending(heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    @staticmethod
    def _resolve(name: str, changes: dict[str, Change], stored: dict[str, str]) -> None:
        for prop, change in changes.items():
            if type(change) is Update:
                current = stored.get(prop)
                if current != change.expected:
                    change.reapply(current, name, prop)

    @staticmethod
    def _apply(changes: dict[str, Change], stored: dict[str, str]) -> None:
        for prop, change in changes.items():
            if type(change) is str:
                stored[prop] = change
            elif change is DELETE:
                stored.pop(prop, None)
            else:
                stored[prop] = change.value  # type: ignore[union-attr]

    def _map(self, name: str, ext: bool) -> dict[str, str] | None:
        maps = self._subjects.get(name)
        if maps is None:
            return None
        return maps[1] if ext else maps[0]

    def _writable_map(self, name: str, ext: bool) -> dict[str, str]:
        maps = self._subjects.get(name)
        if maps is None:
            maps = self._subjects[name] = ({}, {})
        return maps[1] if ext else maps[0]

    async def get(self, name: str, prop: str, *, ext: bool = False) -> Any:
        stored = self._map(name, ext)
        if stored is None or prop not in stored:
            raise KeyError(prop)
        return decode(stored[prop])

    async def set(self, name: str, prop: str, value: str, *, ext: bool = False) -> tuple[bool, Any]:
        stored = self._writable_map(name, ext)
        old = stored.get(prop)
        stored[prop] = value
        return (old is not None, decode(old) if old is not None else None)

    async def update(
        self, name: str, prop: str, fn: Callable[[Any], Any], *, ext: bool = False
    ) -> tuple[Any, Any, bool]:
        stored = self._map(name, ext)
        raw = stored.get(prop) if stored is not None else None
        old = decode(raw) if raw is not None else None
        new = fn(old)
        encoded = encode(new, name, prop)  # before creating anything: a bad value changes nothing
        self._writable_map(name, ext)[prop] = encoded
        return new, old, raw is not None

    async def delete(self, name: str, prop: str, *, ext: bool = False) -> tuple[bool, Any]:
        maps = self._subjects.get(name)
        if maps is None:
            return False, None
        stored = maps[1] if ext else maps[0]
        raw = stored.pop(prop, None)
        if not maps[0] and not maps[1]:
            del self._subjects[name]
        return (raw is not None, decode(raw) if raw is not None else None)

    async def flush(self, name: str) -> None:
        self._subjects.pop(name, None)

    async def subjects(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._subjects if n.startswith(prefix))

    async def check(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release; the data stays readable until the object is dropped."""


def create_memory_storage() -> MemoryStorage:
    """Return a new, empty in-process storage (the default of ``KRulesContainer.subject_storage``)."""
    return MemoryStorage()
