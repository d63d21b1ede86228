"""A Redis-mode app counting one event type per subject, for the failover tests: a Redis primary is
killed and replaced under it, and every count must come out exact (``KRULES_REDIS_WAIT_REPLICAS=1``)."""

from __future__ import annotations

from krules.context import EventContext
from krules.testing import RedisModeApp

SUBJECTS = [f"s{i}" for i in range(8)]


def counting_app(url: str, prefix: str, partitions: int) -> RedisModeApp:
    """An app (not started) adding 1 to a subject's ``count`` for each ``count.inc``, each commit
    acknowledged by a replica."""
    app = RedisModeApp(url, prefix, partitions=partitions, redis_wait_replicas=1)

    @app.on("count.inc")
    async def count(ctx: EventContext) -> None:
        await ctx.subject.set("count", lambda n: (n or 0) + 1)

    return app


async def send_round(app: RedisModeApp) -> None:
    """One ``count.inc`` to each of :data:`SUBJECTS`."""
    for name in SUBJECTS:
        await app.emit("count.inc", name)


async def counted(app: RedisModeApp, expected: int) -> bool:
    """Whether every subject's count is ``expected``."""
    return [await _count(app, name) for name in SUBJECTS] == [expected] * len(SUBJECTS)


async def _count(app: RedisModeApp, name: str) -> int | None:
    try:
        value: int = await app.storage.get(name, "count")
    except KeyError:
        return None
    return value
