"""A rule retried while a downstream service is unavailable, served by ``krules run`` in the
partition fault tests.

``work.requested`` marks its subject ``done`` (one more each time the work really succeeds); while
the file named by ``FLAKY_SWITCH`` exists the downstream is "unavailable" and the call fails with a
retryable error.  Every attempt appends ``<pid> <event id>`` to the file named by ``FLAKY_ATTEMPTS``,
so a test sees which process is retrying what.
"""

from __future__ import annotations

import os
from pathlib import Path

from krules import EventContext, on
from middleware.retry import retry

SWITCH = Path(os.environ["FLAKY_SWITCH"])
ATTEMPTS = Path(os.environ["FLAKY_ATTEMPTS"])


class DownstreamUnavailable(Exception):
    """The downstream service did not answer (retryable)."""


def _plus_one(count: int | None) -> int:
    return (count or 0) + 1


@on("work.requested")
@retry(on=DownstreamUnavailable, attempts=100, backoff=0.3, cap=0.3, jitter=False)
async def do_work(ctx: EventContext) -> None:
    """Call the downstream (fails while the switch file exists), then mark the subject done."""
    with ATTEMPTS.open("a") as log:
        log.write(f"{os.getpid()} {ctx.event_id}\n")
    if SWITCH.exists():
        raise DownstreamUnavailable("the downstream service is unavailable")
    await ctx.subject.set("done", _plus_one)
