"""A turn: one incoming event plus the cascade it causes, with the subjects it touched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from krules.subject import Subject

if TYPE_CHECKING:
    from krules.engine import Engine
    from krules.events import Event

__all__ = ["HandlerFailure", "Turn"]


@dataclass(frozen=True, slots=True)
class HandlerFailure:
    """A handler call (or one of its filters) that raised while handling ``event``."""

    handler: str
    event: Event
    error: BaseException


class Turn:
    """The turn's subjects (one cached object per name), stored together when the turn ends."""

    __slots__ = ("_others", "engine", "failures", "root", "subjects")

    def __init__(self, engine: Engine, root: Event) -> None:
        self.engine = engine
        self.root = root
        self.subjects: dict[str, Subject] = {}
        self.failures: list[HandlerFailure] = []
        self._others: list[Subject] | None = None

    def subject(self, name: str) -> Subject:
        """The turn's subject called ``name`` (created and cached on first use)."""
        subject = self.subjects.get(name)
        if subject is None:
            subject = self.subjects[name] = Subject(name, self.engine)
        return subject

    def adopt(self, subject: Subject) -> None:
        """Make a subject created elsewhere part of this turn, so its cached writes are stored too."""
        known = self.subjects.setdefault(subject.name, subject)
        if known is not subject:
            if self._others is None:
                self._others = []
            if subject not in self._others:
                self._others.append(subject)

    async def commit(self) -> None:
        """Store every touched subject's cached writes in one storage batch."""
        dirty = [s for s in self.subjects.values() if s._changes]
        if self._others:
            dirty.extend(s for s in self._others if s._changes)
        if not dirty:
            return
        await self.engine.storage.store([s._changes for s in dirty])  # type: ignore[misc]
        for subject in dirty:
            subject.stored()
