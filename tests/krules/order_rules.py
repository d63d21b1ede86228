"""Order-recording rules served by ``krules run`` in the partition ownership tests.

``seq.step`` appends its payload's ``i`` to its subject's ``seen`` list with a callable update, so
the list shows every step applied, once each, in the order the subject's turns ran: a client sends
each subject's steps in increasing order, so any list other than ``[0, 1, 2, ...]`` is a lost,
doubled or out-of-order step.  ``handled_by`` records which instances (``KRULES_CONSUMER``) ran a
step of the subject.  With ``ORDER_STEP_SLEEP_MS`` set, each step first sleeps that long, so that
an instance has turns under way at any moment.

``probe.echo`` copies the subject's ``outside`` property (written by another process) to ``echo``
(read back by it).
"""

from __future__ import annotations

import os

from krules import EventContext, on

INSTANCE = os.environ.get("KRULES_CONSUMER", "?")
STEP_SLEEP = int(os.environ.get("ORDER_STEP_SLEEP_MS", "0")) / 1000


def _with_this_instance(seen: list[str] | None) -> list[str]:
    return sorted({*(seen or ()), INSTANCE})


@on("seq.step")
async def record_step(ctx: EventContext) -> None:
    """Append the step's number to the subject's ``seen`` list."""
    i = ctx.payload["i"]
    if STEP_SLEEP:
        await ctx.clock.sleep(STEP_SLEEP)
    await ctx.subject.set("seen", lambda seen: [*(seen or ()), i])
    await ctx.subject.set("handled_by", _with_this_instance)


@on("probe.echo")
async def echo(ctx: EventContext) -> None:
    """Copy ``outside`` to ``echo``."""
    await ctx.subject.set("echo", await ctx.subject.get("outside"))
