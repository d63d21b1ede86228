"""Redis mode, instructions per order: one instance draining prefilled partition streams, under callgrind.

Wall-clock rates on a shared machine drift by tens of percent; instruction counts do not.  The
streams of a throwaway redis-server are filled with ``order.submitted`` events (the cascade of
:mod:`bench.order_cascade`: 5 events, 1 turn per order) before the instance starts; the instance
(engine + partition worker, the garbage-collector policy of ``krules run``) then runs under
``valgrind --tool=callgrind`` until every order is shipped: once with no middleware, once with the
default chain ``krules run`` installs when no trace exporter is set (logging at INFO to a handler
that drops the lines, metrics, dead_letter, circuit_breaker, retry, timeout).  Two drains (200 and
2,200 orders, each after 200 warm-up orders) are counted; the difference divided by 2,000 is the
cost of one order without start-up.  Only the instance's process is counted, not redis-server.
Needs ``valgrind``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench._common import report
from bench._redis import redis_url
from bench.instructions import instructions
from krules.transport.stream_client import AsyncStreamClient
from storage.redis import create_redis_storage
from storage.redis.keys import KeySchema

SMALL, LARGE, WARM_UP, BATCH = 200, 2200, 200, 100

DRAIN = """
import asyncio, sys
from dependency_injector import providers
from bench import order_cascade
from bench.default_chain import quiet_handler_lines
from krules import KRulesContainer
from krules.assembly import apply_gc_policy
from krules.config import Settings
from krules.transport.redis_streams import stream_worker
from middleware.registry import build_default_chain
from storage.redis import create_redis_storage

async def main(url, prefix, orders, variant):
    settings = Settings(redis_url=url, key_prefix=prefix, stream_batch=100, stream_block_ms=20)
    container = KRulesContainer()
    container.settings.override(providers.Object(settings))
    storage = create_redis_storage(url, prefix)
    container.subject_storage.override(providers.Object(storage))
    if variant == "untraced":
        quiet_handler_lines()
        for mw in build_default_chain(settings, env={}, tracer_provider=None).middlewares:
            container.registry().add_middleware(mw)
    order_cascade.build(container)
    engine = container.engine()
    worker = stream_worker(engine, storage)
    done, shipped = asyncio.Event(), [0]
    def count(event):
        if event.type == "order.shipped":
            shipped[0] += 1
            if shipped[0] == orders:
                done.set()
    engine.event_observers.append(count)
    await engine.start()
    apply_gc_policy(settings)  # as krules run does
    task = asyncio.ensure_future(worker.run())
    await asyncio.wait_for(done.wait(), timeout=600)
    worker.stop()
    await task
    await engine.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
"""


async def _prefill(url: str, prefix: str, orders: int) -> None:
    storage = create_redis_storage(url, prefix)
    await storage.run(
        lambda: storage.commands.execute("SET", KeySchema(prefix, 1).partition_count(), 1),
        "record the partition count",
    )
    await storage.close()
    async with AsyncStreamClient(url, prefix) as client:
        for first in range(0, orders, BATCH):
            await client.emit_batch(
                [
                    {"type": "order.submitted", "subject": f"order-{i}", "data": {"total": 10}}
                    for i in range(first, min(orders, first + BATCH))
                ]
            )


def _drain(url: str, script: Path, prefix: str, orders: int, variant: str) -> int:
    asyncio.run(_prefill(url, prefix, orders))
    return instructions(sys.executable, script, url, prefix, orders, variant)


def main() -> int:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian package valgrind)", file=sys.stderr)
        return 2
    os.environ["PYTHONPATH"] = os.getcwd()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(DRAIN)
    script = Path(handle.name)
    counts: dict[str, int] = {}
    try:
        with redis_url() as url:
            for variant in ("bare", "untraced"):
                small = _drain(url, script, f"bench-instr-{variant}-small:", WARM_UP + SMALL, variant)
                large = _drain(url, script, f"bench-instr-{variant}-large:", WARM_UP + LARGE, variant)
                counts[variant] = round((large - small) / (LARGE - SMALL))
    finally:
        script.unlink()
    report(
        "stream_orders_instructions",
        storage="redis streams",
        instructions_per_order=counts["bare"],
        untraced_chain_instructions_per_order=counts["untraced"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
