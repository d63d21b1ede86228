"""Cost of one emit with 1, 10, 100 and 1,000 registered rules that do not match it.

Half of the non-matching rules use exact types, half globs.  Reports microseconds per root emit
(a whole turn: lane, dispatch, store) and per emit inside a handler (a child event), and the ratio
of the 1,000-rule cost to the 1-rule cost, which is the figure the index exists for.
"""

from __future__ import annotations

import asyncio
import time

from bench._common import median_seconds, report, scale
from krules import KRulesContainer
from krules.context import EventContext

EMITS = 20_000
RULE_COUNTS = (1, 10, 100, 1000)


def build(rules: int) -> KRulesContainer:
    container = KRulesContainer()
    on, _, _, _ = container.handlers()

    async def unrelated(ctx: EventContext) -> None:
        raise AssertionError("a non-matching rule ran")

    for i in range(rules):
        on(f"other.{i}" if i % 2 == 0 else f"other.{i}.*")(unrelated)
    return container


async def measure(rules: int, emits: int) -> tuple[float, float]:
    container = build(rules)
    engine = container.engine()
    on, _, _, _ = container.handlers()

    @on("bench.burst")
    async def burst(ctx: EventContext) -> None:
        for _ in range(emits):
            await ctx.emit("bench.unmatched")

    async def root() -> float:
        started = time.perf_counter()
        for _ in range(emits):
            await engine.emit("bench.unmatched", "s")
        return time.perf_counter() - started

    async def child() -> float:
        started = time.perf_counter()
        await engine.emit("bench.burst", "s")
        return time.perf_counter() - started

    return await median_seconds(root) / emits, await median_seconds(child) / emits


async def main() -> None:
    emits = max(10, int(EMITS * scale()))
    costs = {}
    for rules in RULE_COUNTS:
        root, child = await measure(rules, emits)
        costs[rules] = root
        report(
            "dispatch_cost",
            rules=rules,
            us_per_emit=round(root * 1e6, 3),
            us_per_child_emit=round(child * 1e6, 3),
        )
    report("dispatch_cost_ratio", ratio_1000_to_1=round(costs[1000] / costs[1], 3))


if __name__ == "__main__":
    asyncio.run(main())
