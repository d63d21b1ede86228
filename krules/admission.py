"""Admission of turns: one at a time per subject, in arrival order, and at most N at once.

Each subject has a lane: while a turn of subject S runs, later turns of S wait in a FIFO and the
lane is handed to the next one directly when the running turn leaves, so arrival order is kept.
Turns that hold their lane then take one of ``max_running`` slots, handed over the same way (a
woken waiter owns its slot; newcomers queue behind waiters), so no turn starves.  Waiting for the
lane first means a hot subject's backlog never holds slots other subjects could use.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

__all__ = ["Admission"]

_Waiters = deque[asyncio.Future[None]]


def _hand_over(waiters: _Waiters) -> bool:
    """Wake the first waiter still waiting; return False when there is none."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return True
    return False


async def _wait(waiters: _Waiters, pass_on: Callable[[], None]) -> None:
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled():
            pass_on()  # it was handed to us just before the cancel: give it to the next one
        else:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
        raise


class Admission:
    """Per-subject lanes plus a bound on running turns."""

    __slots__ = ("_lanes", "_max_running", "_running", "_slot_waiters")

    def __init__(self, max_running: int) -> None:
        # subject -> its waiters (None: busy, nobody waiting); a free subject is absent
        self._lanes: dict[str, _Waiters | None] = {}
        self._max_running = max_running
        self._running = 0
        self._slot_waiters: _Waiters = deque()

    def enter_now(self, subject: str) -> bool:
        """Enter without waiting when the subject's lane and a slot are both free (the hot path)."""
        if subject in self._lanes or self._running >= self._max_running or self._slot_waiters:
            return False
        self._lanes[subject] = None
        self._running += 1
        return True

    async def enter(self, subject: str) -> None:
        """Wait for the subject's lane, then for a slot."""
        if subject in self._lanes:
            waiters = self._lanes[subject]
            if waiters is None:
                waiters = self._lanes[subject] = deque()
            await _wait(waiters, lambda: self._leave_lane(subject))
        else:
            self._lanes[subject] = None
        try:
            if self._running >= self._max_running or self._slot_waiters:
                await _wait(self._slot_waiters, self._leave_slot)  # the slot is handed over counted
            else:
                self._running += 1
        except BaseException:
            self._leave_lane(subject)
            raise

    def leave(self, subject: str) -> None:
        """Give the slot and the lane to whoever waits next."""
        slot_waiters = self._slot_waiters
        if not slot_waiters or not _hand_over(slot_waiters):
            self._running -= 1
        waiters = self._lanes.get(subject)
        if not waiters or not _hand_over(waiters):
            del self._lanes[subject]

    def _leave_slot(self) -> None:
        if not _hand_over(self._slot_waiters):
            self._running -= 1

    def _leave_lane(self, subject: str) -> None:
        waiters = self._lanes.get(subject)
        if waiters is None or not _hand_over(waiters):
            del self._lanes[subject]

    @property
    def running(self) -> int:
        """Turns holding a slot now."""
        return self._running
