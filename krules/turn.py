"""A turn: one incoming event plus the cascade it causes, with the subjects it touched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from krules.subject import Subject

if TYPE_CHECKING:
    from krules.changes import SubjectChanges
    from krules.engine import Engine
    from krules.errors import StorageError
    from krules.events import Event
    from krules.ports import Receipt

__all__ = ["HandlerFailure", "Turn"]


@dataclass(frozen=True, slots=True)
class HandlerFailure:
    """A handler call (or one of its filters) that raised while handling ``event``."""

    handler: str
    event: Event
    error: BaseException


class Turn:
    """The turn's subjects (one cached object per name), stored together when the turn ends.

    A turn whose root event came from a partition stream has a ``receipt``: its end is a commit
    that stores the writes, marks the event processed and acknowledges the entry at once, and the
    events it emitted to subjects of other partitions (its ``outbox``) are appended to their
    streams just before.
    """

    __slots__ = (
        "_others",
        "_reread",
        "aborted",
        "closed",
        "committed",
        "engine",
        "failures",
        "outbox",
        "receipt",
        "root",
        "subjects",
    )

    def __init__(self, engine: Engine, root: Event, receipt: Receipt | None = None) -> None:
        self.engine = engine
        self.root = root
        self.receipt = receipt
        self.subjects: dict[str, Subject] = {}
        self.failures: list[HandlerFailure] = []
        self.outbox: list[Event] = []
        self._others: list[Subject] | None = None
        self._reread: list[Subject] | None = None
        self.closed = False
        self.committed = True
        """False when the commit found the root event committed before (nothing was written)."""
        self.aborted: StorageError | None = None
        """The storage failure a handler let through: the turn is then not stored at all."""

    def subject(self, name: str) -> Subject:
        """The turn's subject called ``name`` (created and cached on first use)."""
        subject = self.subjects.get(name)
        if subject is None:
            subject = self.subjects[name] = Subject(name, self.engine)
            subject._turn = self
        return subject

    def release_subjects(self) -> None:
        """Unlink the turn's subjects from it once it is stored, so that no reference cycle is left
        per turn (they are freed at once, not by the cyclic garbage collector)."""
        for subject in self.subjects.values():
            subject._turn = None
        if self._others:
            for subject in self._others:
                subject._turn = None

    def adopt(self, subject: Subject) -> None:
        """Make a subject created elsewhere part of this turn, so its cached writes are stored too."""
        subject._turn = self
        known = self.subjects.setdefault(subject.name, subject)
        if known is not subject:
            if self._others is None:
                self._others = []
            if subject not in self._others:
                self._others.append(subject)

    def reread_after(self, subject: Subject) -> None:
        """Drop ``subject``'s cache when the turn ends (it called ``store()``): a subject object that
        outlives the turn then reads what is stored, as after a store in KRules."""
        if self._reread is None:
            self._reread = []
        if subject not in self._reread:
            self._reread.append(subject)

    def close(self) -> list[tuple[Subject, SubjectChanges]]:
        """End the turn: no more writes; hand over every touched subject's cached changes."""
        self.closed = True
        taken = []
        for subject in self.subjects.values():
            changes = subject._changes
            if changes is not None:  # possibly empty: storing an empty batch entry writes nothing
                taken.append((subject, changes))
                subject._changes = None
        if self._others:
            for subject in self._others:
                changes = subject.take_changes()
                if changes is not None:
                    taken.append((subject, changes))
        if self._reread:  # those with writes to store: once they are stored (commit)
            storing = {id(subject) for subject, _ in taken}
            for subject in self._reread:
                if id(subject) not in storing:
                    subject.forget_cache()
        return taken

    async def commit(self, taken: list[tuple[Subject, SubjectChanges]] | None = None) -> None:
        """Close the turn (unless ``taken`` is what :meth:`close` returned) and store the changes in
        one storage batch (the receipt's commit when the turn has one).  If that fails, the changes go
        back to their subjects and the error propagates."""
        if taken is None:
            taken = self.close()
        receipt = self.receipt
        if self.outbox:
            transport = self.engine.transport
            if transport is None:
                raise RuntimeError("a turn has an outbox but its engine has no transport")
            await transport.send(self.outbox, receipt)
        if not taken and receipt is None:
            return
        try:
            if receipt is None:
                await self.engine.storage.store([c for _, c in taken])
            else:
                self.committed = await receipt.commit([c for _, c in taken])
        except BaseException:
            for subject, changes in taken:
                subject.restore_changes(changes)
            raise
        for subject, changes in taken:
            subject.stored(changes)
        if self._reread:
            for subject in self._reread:
                subject.forget_cache()
