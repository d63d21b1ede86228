"""Durable timers in Redis mode: 100,000 timers coming due at 10,000 per second.

One instance (this process, :class:`krules.testing.RedisModeApp`) first schedules the timers from
``timers.plan`` turns (100 timers each, over 1,000 subjects), all due from a common start time at
``BENCH_TIMER_RATE`` (10,000) per second; then it lets them come due.  Reported:

* firing lag p50/p99/max: from a timer's due time to the start of its handler;
* Redis commands per timer, counted by the server (``INFO commandstats``, commands inside scripts
  included), while scheduling (the plan turns' commits included) and while firing (moving due
  timers into the stream, reading them, committing each timer's turn);
* the poll interval (``KRULES_TIMER_POLL_MS``, 20) bounds the lag's floor: a timer waits for the
  next move.

``BENCH_SCALE`` shrinks the count (the rate stays); ``KRULES_PARTITIONS`` (default 4) partitions.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid

import redis.asyncio as aioredis

from bench._common import redis_commands, report, scale
from bench._redis import redis_url
from krules.context import EventContext
from krules.testing import RedisModeApp

TIMERS = 100_000
PER_TURN = 100
SUBJECTS = 1_000


async def run(url: str) -> None:
    count = max(PER_TURN, int(TIMERS * scale()) // PER_TURN * PER_TURN)
    rate = float(os.environ.get("BENCH_TIMER_RATE", "10000"))
    partitions = int(os.environ.get("KRULES_PARTITIONS", "4"))
    app = RedisModeApp(url, f"bench-timers-{uuid.uuid4().hex[:8]}:", partitions=partitions)
    lags: list[float] = []
    done = asyncio.Event()

    @app.on("timers.plan")
    async def plan(ctx: EventContext) -> None:
        start, first = float(ctx.payload["start"]), int(ctx.payload["first"])
        for i in range(first, first + PER_TURN):
            await ctx.subject.schedule(
                "timers.due", after=max(0.0, start + i / rate - ctx.clock.now()), key=f"t{i}"
            )

    @app.on("timers.due")
    async def due(ctx: EventContext) -> None:
        lags.append(time.time() - ctx.raw_event.time)
        if len(lags) == count:
            done.set()

    client = aioredis.Redis.from_url(url)
    await app.start()
    try:
        start = time.time() + 3.0 + count / 4_000  # room to schedule them all before the first is due
        before = await redis_commands(client)
        turns = [
            app.emit("timers.plan", f"device-{n % SUBJECTS}", {"start": start, "first": n * PER_TURN})
            for n in range(count // PER_TURN)
        ]
        await asyncio.gather(*turns)

        async def scheduled() -> int:
            return sum(
                [await client.zcard(f"{app.storage.keys.prefix}{{p{p}}}:timers") for p in range(partitions)]
            )

        while await scheduled() < count and time.time() < start:
            await asyncio.sleep(0.05)
        scheduling = await redis_commands(client) - before
        if time.time() >= start:
            raise SystemExit("scheduling took longer than the room left for it; lower BENCH_SCALE")
        await asyncio.sleep(max(0.0, start - time.time()))
        before = await redis_commands(client)
        await asyncio.wait_for(done.wait(), count / rate + 60)
        firing = await redis_commands(client) - before
    finally:
        await app.stop()
        await client.aclose()
    lags.sort()
    report(
        "timers",
        timers=count,
        rate_per_s=rate,
        partitions=partitions,
        lag_p50_ms=round(statistics.median(lags) * 1000, 1),
        lag_p99_ms=round(lags[int(len(lags) * 0.99) - 1] * 1000, 1),
        lag_max_ms=round(lags[-1] * 1000, 1),
        redis_commands_per_timer_scheduling=round(scheduling / count, 2),
        redis_commands_per_timer_firing=round(firing / count, 2),
    )


def main() -> None:
    with redis_url() as url:
        asyncio.run(run(url))


if __name__ == "__main__":
    main()
