"""Counting rules served by ``krules run`` in the partition fault tests.

Exact counters make a lost or doubly applied event visible: ``count.inc`` adds one to its
subject's ``count`` and emits ``count.total`` to ``total-<k>`` (``k`` from the payload), a subject
that may live in another partition (so the emit crosses partitions through the streams), whose
``count`` adds one as well.  Every subject also records in ``handled_by`` which instances (their
``KRULES_PARTITION_ID``) ever handled one of its events.
"""

from __future__ import annotations

import os

from krules import EventContext, on

INSTANCE = os.environ.get("KRULES_PARTITION_ID", "all")
"""The instance serving these rules, as its partition ids (``all`` when it owns them all)."""


def _plus_one(count: int | None) -> int:
    return (count or 0) + 1


def _with_this_instance(seen: list[str] | None) -> list[str]:
    return sorted({*(seen or ()), INSTANCE})


@on("count.inc")
async def count_event(ctx: EventContext) -> None:
    """Count the event on its subject and pass it on to the subject's total."""
    await ctx.subject.set("count", _plus_one)
    await ctx.subject.set("handled_by", _with_this_instance)
    await ctx.emit("count.total", {"from": ctx.subject.name}, subject=f"total-{ctx.payload['k']}")


@on("count.total")
async def count_total(ctx: EventContext) -> None:
    """Count one more event of the total's group."""
    await ctx.subject.set("count", _plus_one)
    await ctx.subject.set("handled_by", _with_this_instance)
