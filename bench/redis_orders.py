"""The order cascade on Redis: 5,000 orders on a real redis-server on loopback, ``store()`` per order.

Same rules as ``bench.order_cascade``; the shipping handler stores the order explicitly (as the
KRules benchmark does), so every order costs one load and one stored batch.  Prints orders/s and the
Redis commands per order counted by the server (``INFO commandstats``, which also counts the calls a
Lua script makes), plus the round trips per order seen by the client.
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from dependency_injector import providers

from bench import order_cascade
from bench._common import median_seconds, redis_commands, report, scale
from bench._redis import redis_url
from krules import KRulesContainer
from storage.redis import create_redis_storage

ORDERS = 5_000


def build(url: str, prefix: str) -> KRulesContainer:
    container = KRulesContainer()
    container.subject_storage.override(providers.Object(create_redis_storage(url=url, key_prefix=prefix)))
    return order_cascade.build(container, store_each=True)


async def main() -> None:
    orders = max(1, int(ORDERS * scale()))
    with redis_url() as url:
        probe = aioredis.Redis.from_url(url, decode_responses=True)
        runs = 0
        counted: list[float] = []

        async def run() -> float:
            nonlocal runs
            runs += 1
            container = build(url, f"bench{runs}:")
            engine = container.engine()
            await engine.start()
            await engine.emit("order.submitted", "warm-up", {"total": 1})  # scripts loaded, pool warm
            before = await redis_commands(probe)
            started = time.perf_counter()
            for i in range(orders):
                await engine.emit("order.submitted", f"order-{i}", {"total": 10})
            elapsed = time.perf_counter() - started
            counted.append((await redis_commands(probe) - before) / orders)
            stored = await container.subject_storage().get(f"order-{orders - 1}", "status")
            if stored != "shipped":
                raise SystemExit(f"the last order was not stored as shipped: {stored!r}")
            await engine.close()
            return elapsed

        await probe.config_resetstat()
        elapsed = await median_seconds(run)
        await probe.aclose()
    report(
        "redis_orders",
        storage="redis",
        orders=orders,
        orders_per_s=round(orders / elapsed),
        us_per_order=round(elapsed / orders * 1e6, 1),
        redis_commands_per_order=round(max(counted), 2),
    )


if __name__ == "__main__":
    asyncio.run(main())
