"""The order cascade on memory storage: 20,000 orders, 5 events each.

order.submitted -> order.validated -> payment.completed -> (status set: subject-property-changed)
-> order.shipped.  Each order is one turn; its cached write is stored in the memory storage (which
really stores) when the turn ends.  Prints orders/s and events/s (median of BENCH_REPEATS runs).
"""

from __future__ import annotations

import asyncio
import time

from bench._common import median_seconds, report, scale
from krules import KRulesContainer
from krules.context import EventContext
from krules.event_types import SUBJECT_PROPERTY_CHANGED
from storage.memory import MemoryStorage

ORDERS = 20_000


def build(container: KRulesContainer | None = None, *, store_each: bool = False) -> KRulesContainer:
    """Register the cascade's rules on ``container`` (a new one by default).

    ``store_each`` makes the shipping handler call ``store()`` itself, as the KRules Redis benchmark
    does; otherwise the write is stored when the turn ends.
    """
    container = container if container is not None else KRulesContainer()
    on, _, _, _ = container.handlers()

    @on("order.submitted")
    async def validate_order(ctx: EventContext) -> None:
        if ctx.payload["total"] > 0:
            await ctx.emit("order.validated")

    @on("order.validated")
    async def process_payment(ctx: EventContext) -> None:
        await ctx.emit("payment.completed")

    @on("payment.completed")
    async def ship_order(ctx: EventContext) -> None:
        await ctx.subject.set("status", "shipped")
        if store_each:
            await ctx.subject.store()
        await ctx.emit("order.shipped")

    return container


async def events_per_order() -> int:
    """Count the cascade of one order (outside the timed runs, so the counter costs nothing)."""
    container = build()
    seen: list[str] = []
    container.engine().event_observers.append(lambda event: seen.append(event.type))
    await container.engine().emit("order.submitted", "order-0", {"total": 10})
    if seen[-2:] != [SUBJECT_PROPERTY_CHANGED, "order.shipped"]:
        raise SystemExit(f"unexpected cascade: {seen}")
    return len(seen)


async def main() -> None:
    orders = max(1, int(ORDERS * scale()))
    per_order = await events_per_order()

    async def run() -> float:
        container = build()  # a fresh app and storage per run: every run does the same work
        emit = container.engine().emit
        started = time.perf_counter()
        for i in range(orders):
            await emit("order.submitted", f"order-{i}", {"total": 10})
        elapsed = time.perf_counter() - started
        storage = container.subject_storage()
        if not isinstance(storage, MemoryStorage) or len(await storage.subjects("order-")) != orders:
            raise SystemExit("the cascade did not store every order")
        return elapsed

    elapsed = await median_seconds(run)
    report(
        "order_cascade",
        storage="memory",
        orders=orders,
        events_per_order=per_order,
        orders_per_s=round(orders / elapsed),
        events_per_s=round(orders * per_order / elapsed),
        us_per_order=round(elapsed / orders * 1e6, 2),
    )


if __name__ == "__main__":
    asyncio.run(main())
