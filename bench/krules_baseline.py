"""The same workloads on krules-framework 3.x (KRules), for side-by-side figures.

Run with an interpreter that has ``krules-framework`` installed (``make bench-compare`` builds one
in ``.venv-krules``).  KRules' default storage stores nothing, as in its own benchmarks.  This file
imports nothing from this project but ``bench._common``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from bench._common import median_seconds, redis_commands, report, scale

try:
    from krules_core.container import KRulesContainer  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the interpreter
    sys.exit(
        "krules_baseline needs krules-framework: run it with .venv-krules/bin/python (make bench-compare)."
    )


def register_cascade(container: Any, *, store_each: bool) -> Any:
    """The rules of ``bench.order_cascade`` on a KRules container; returns its ``emit``."""
    on, _, _, emit = container.handlers()

    @on("order.submitted")
    async def validate_order(ctx: Any) -> None:
        if ctx.payload["total"] > 0:
            await ctx.emit("order.validated")

    @on("order.validated")
    async def process_payment(ctx: Any) -> None:
        await ctx.emit("payment.completed")

    @on("payment.completed")
    async def ship_order(ctx: Any) -> None:
        await ctx.subject.set("status", "shipped")
        if store_each:
            await ctx.subject.store()
        await ctx.emit("order.shipped")

    return emit


async def order_cascade() -> None:
    orders = max(1, int(20_000 * scale()))

    async def run() -> float:
        container = KRulesContainer()
        emit = register_cascade(container, store_each=False)
        started = time.perf_counter()
        for i in range(orders):
            await emit("order.submitted", container.subject(f"order-{i}"), {"total": 10})
        return time.perf_counter() - started

    elapsed = await median_seconds(run)
    report(
        "order_cascade",
        impl="krules-framework",
        storage="empty (stores nothing)",
        orders=orders,
        orders_per_s=round(orders / elapsed),
        events_per_s=round(orders * 5 / elapsed),
        us_per_order=round(elapsed / orders * 1e6, 2),
    )


async def dispatch_cost() -> None:
    emits = max(10, int(5_000 * scale()))
    costs = {}
    for rules in (1, 10, 100, 1000):
        container = KRulesContainer()
        on, _, _, emit = container.handlers()

        async def unrelated(ctx: Any) -> None:
            raise AssertionError("a non-matching rule ran")

        for i in range(rules):
            on(f"other.{i}" if i % 2 == 0 else f"other.{i}.*")(unrelated)
        subject = container.subject("s")

        async def run(emit: Any = emit, subject: Any = subject) -> float:
            started = time.perf_counter()
            for _ in range(emits):
                await emit("bench.unmatched", subject)
            return time.perf_counter() - started

        costs[rules] = await median_seconds(run) / emits
        report(
            "dispatch_cost", impl="krules-framework", rules=rules, us_per_emit=round(costs[rules] * 1e6, 3)
        )
    report("dispatch_cost_ratio", impl="krules-framework", ratio_1000_to_1=round(costs[1000] / costs[1], 3))


async def middleware_overhead() -> None:
    emits = max(10, int(20_000 * scale()))
    figures = {}
    for count in (0, 5):
        container = KRulesContainer()
        on, _, middleware, emit = container.handlers()
        for _ in range(count):

            async def passthrough(ctx: Any, next: Any) -> None:
                await next()

            middleware(passthrough)

        @on("bench.event")
        async def handler(ctx: Any) -> None:
            return None

        subject = container.subject("s")

        async def run(emit: Any = emit, subject: Any = subject) -> float:
            started = time.perf_counter()
            for _ in range(emits):
                await emit("bench.event", subject)
            return time.perf_counter() - started

        figures[count] = await median_seconds(run) / emits
    report(
        "middleware_overhead",
        impl="krules-framework",
        middlewares=5,
        us_per_emit_without=round(figures[0] * 1e6, 3),
        us_per_emit_with=round(figures[5] * 1e6, 3),
        us_added_per_call=round((figures[5] - figures[0]) * 1e6, 3),
    )


async def redis_orders() -> None:
    import redis.asyncio as aioredis
    from dependency_injector import providers
    from redis_subjects_storage.storage_impl import create_redis_storage  # type: ignore[import-not-found]

    url = os.environ.get("KRULES_REDIS_URL")
    if not url:
        sys.exit("redis_orders needs KRULES_REDIS_URL (bench.compare starts a server and sets it).")
    orders = max(1, int(5_000 * scale()))
    if True:  # same shape as bench.redis_orders
        probe = aioredis.Redis.from_url(url, decode_responses=True)
        runs = 0
        counted: list[float] = []

        async def run() -> float:
            nonlocal runs
            runs += 1
            client = aioredis.Redis.from_url(url)
            container = KRulesContainer()
            container.subject_storage.override(providers.Object(create_redis_storage(client, f"kr{runs}:")))
            emit = register_cascade(container, store_each=True)
            await emit("order.submitted", container.subject("warm-up"), {"total": 1})
            before = await redis_commands(probe)
            started = time.perf_counter()
            for i in range(orders):
                await emit("order.submitted", container.subject(f"order-{i}"), {"total": 10})
            elapsed = time.perf_counter() - started
            counted.append((await redis_commands(probe) - before) / orders)
            await client.aclose()
            return elapsed

        elapsed = await median_seconds(run)
        await probe.aclose()
    report(
        "redis_orders",
        impl="krules-framework",
        orders=orders,
        orders_per_s=round(orders / elapsed),
        us_per_order=round(elapsed / orders * 1e6, 1),
        redis_commands_per_order=round(max(counted), 2),
    )


def _increments_worker(mode: str, url: str, prefix: str, count: int, start: Any, spans: Any) -> None:
    spans.put(asyncio.run(_increments(mode, url, prefix, count, start)))


async def _increments(mode: str, url: str, prefix: str, count: int, start: Any) -> tuple[float, float]:
    import redis.asyncio as aioredis
    from dependency_injector import providers
    from redis_subjects_storage.storage_impl import create_redis_storage

    client = aioredis.Redis.from_url(url)
    container = KRulesContainer()
    container.subject_storage.override(providers.Object(create_redis_storage(client, prefix)))

    def increment(n: Any) -> int:
        return (n or 0) + 1

    await asyncio.to_thread(start.wait)
    started = time.monotonic()
    for _ in range(count):
        subject = container.subject("counter")
        if mode == "cached (default)":
            await subject.set("n", increment)
            await subject.store()
        else:
            await subject.set("n", increment, use_cache=False)
    finished = time.monotonic()
    await client.aclose()
    return started, finished


async def redis_increments() -> None:
    import multiprocessing
    import queue
    import uuid

    import redis.asyncio as aioredis

    url = os.environ.get("KRULES_REDIS_URL")
    if not url:
        sys.exit("redis_increments needs KRULES_REDIS_URL (bench.compare starts a server and sets it).")
    processes = int(os.environ.get("BENCH_PROCESSES", "2"))
    count = max(1, round(2_000 * scale()))
    for mode in ("cached (default)", "exact (use_cache=False)"):
        context = multiprocessing.get_context("spawn")
        start, spans = context.Barrier(processes), context.Queue()
        prefix = f"krinc-{uuid.uuid4().hex[:8]}:"
        workers = [
            context.Process(target=_increments_worker, args=(mode, url, prefix, count, start, spans))
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        times: list[tuple[float, float]] = []
        while len(times) < processes:
            try:
                times.append(spans.get(timeout=1.0))
            except queue.Empty:
                if any(worker.exitcode not in (None, 0) for worker in workers):
                    sys.exit(f"a KRules {mode} increments process failed")
        for worker in workers:
            worker.join()
        seconds = max(end for _, end in times) - min(begin for begin, _ in times)
        probe = aioredis.Redis.from_url(url)
        raw = await probe.hget(f"s:{prefix}counter", "pn")
        await probe.aclose()
        final = int(raw) if raw is not None else 0
        expected = processes * count
        report(
            "redis_increments",
            impl="krules-framework",
            mode=mode,
            processes=processes,
            final=final,
            expected=expected,
            lost=expected - final,
            increments_per_s=round(expected / seconds),
        )


WORKLOADS = {
    "order_cascade": order_cascade,
    "dispatch_cost": dispatch_cost,
    "middleware_overhead": middleware_overhead,
    "redis_orders": redis_orders,
    "redis_increments": redis_increments,
}


async def main(names: list[str]) -> None:
    for name in names or list(WORKLOADS):
        await WORKLOADS[name]()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
