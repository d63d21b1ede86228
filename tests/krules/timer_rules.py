"""Timer rules served by ``krules run`` in the timer crash tests.

``timers.plan`` schedules ``count`` timers of type ``timers.fire`` for its subject, the ``i``-th
due ``start + i * spacing`` seconds from now (keys ``k<i>``); each firing appends its key to the
subject's ``fired`` list, so a timer lost or fired twice, or out of due order, shows there.
"""

from __future__ import annotations

from typing import Any

from krules import EventContext, on


@on("timers.plan")
async def plan(ctx: EventContext) -> None:
    """Schedule the subject's timers."""
    start, spacing = float(ctx.payload["start"]), float(ctx.payload["spacing"])
    for i in range(int(ctx.payload["count"])):
        await ctx.subject.schedule("timers.fire", after=start + i * spacing, key=f"k{i}")


@on("timers.fire")
async def fire(ctx: EventContext) -> None:
    """Record the firing."""
    key = ctx.timer_key

    def appended(fired: list[Any] | None) -> list[Any]:
        return [*(fired or []), key]

    await ctx.subject.set("fired", appended)
