"""Overhead of five no-op middlewares around a handler call.

Emits the same event (one matching handler) with 0 and with 5 pass-through middlewares and reports
microseconds per emit for both and the added cost per handler call.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench._common import median_seconds, report, scale
from krules import KRulesContainer
from krules.context import EventContext

EMITS = 20_000


async def per_emit(middlewares: int, emits: int) -> float:
    container = KRulesContainer()
    on, _, middleware, _ = container.handlers()

    for _ in range(middlewares):

        async def passthrough(ctx: EventContext, next: Any) -> None:
            await next()

        middleware(passthrough)

    @on("bench.event")
    async def handler(ctx: EventContext) -> None:
        return None

    engine = container.engine()

    async def run() -> float:
        started = time.perf_counter()
        for _ in range(emits):
            await engine.emit("bench.event", "s")
        return time.perf_counter() - started

    return await median_seconds(run) / emits


async def main() -> None:
    emits = max(10, int(EMITS * scale()))
    bare = await per_emit(0, emits)
    wrapped = await per_emit(5, emits)
    report(
        "middleware_overhead",
        middlewares=5,
        us_per_emit_without=round(bare * 1e6, 3),
        us_per_emit_with=round(wrapped * 1e6, 3),
        us_added_per_call=round((wrapped - bare) * 1e6, 3),
        us_per_middleware=round((wrapped - bare) * 1e6 / 5, 3),
    )


if __name__ == "__main__":
    asyncio.run(main())
