"""Cost of one emit with 1, 10, 100 and 1,000 registered rules that do not match it.

Half of the non-matching rules use exact types, half globs.  Reports microseconds per root emit
(a whole turn: lane, dispatch, store) and per emit inside a handler (a child event), and the ratio
of the 1,000-rule cost to the 1-rule cost, which is the figure the index exists for.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from bench._common import REPEATS, report, scale
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


async def timers(
    rules: int, emits: int
) -> tuple[Callable[[], Awaitable[float]], Callable[[], Awaitable[float]]]:
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

    return root, child


async def main() -> None:
    emits = max(10, int(EMITS * scale()))
    apps = {rules: await timers(rules, emits) for rules in RULE_COUNTS}
    roots: dict[int, list[float]] = {rules: [] for rules in RULE_COUNTS}
    children: dict[int, list[float]] = {rules: [] for rules in RULE_COUNTS}
    # Round-robin over the rule counts, so a slow spell of a shared machine hits all of them alike.
    for _ in range(max(REPEATS, 5)):
        for rules, (root, child) in apps.items():
            roots[rules].append(await root() / emits)
            children[rules].append(await child() / emits)
    for rules in RULE_COUNTS:
        report(
            "dispatch_cost",
            rules=rules,
            us_per_emit=round(statistics.median(roots[rules]) * 1e6, 3),
            us_per_child_emit=round(statistics.median(children[rules]) * 1e6, 3),
        )
    ratio = statistics.median(roots[1000]) / statistics.median(roots[1])
    report("dispatch_cost_ratio", ratio_1000_to_1=round(ratio, 3))


if __name__ == "__main__":
    asyncio.run(main())
