"""Redis mode end to end: 5,000 orders queued by the stream client, processed by one instance.

A client process appends ``order.submitted`` events to the partition streams with
:class:`krules.transport.stream_client.AsyncStreamClient` (batches of 100, as fast as it can) while
one instance (this process: engine + partition worker, the order cascade of
``bench.order_cascade``) reads them in batches and commits each turn (writes + processed id + XACK
in one script).  Reported:

* orders/s from the first emit to the last order's ``order.shipped``;
* Redis commands per order counted by the server (``INFO commandstats``; the client's XADDs and the
  commands inside scripts included), the server's CPU time per order (``INFO cpu``:
  the client's appends and the network included), the server's time running commands per order
  (``INFO commandstats``, ``usec`` of the top-level commands: the scripts with what they run, the
  reads, the client's appends) and the instance's round trips per order (socket writes);
* p50/p99 latency from an order's emit (its CloudEvent ``time``) to its cascade's last event.

``KRULES_PARTITIONS`` (default 1) partitions, all owned by the one instance.
``KRULES_REDIS_WAIT_REPLICAS=n`` starts the throwaway server with ``n`` replicas and commits with
``WAIT n`` (the cost of waiting for replicas; ``BENCH_REPLICAS=n`` starts the replicas without
waiting for them, the figure to compare with); ``BENCH_CLUSTER=1`` runs on a throwaway Redis Cluster
of 3 primaries instead (the server figures summed over the primaries).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from typing import Any

from dependency_injector import providers

from bench import order_cascade
from bench._common import redis_command_usec, redis_commands, redis_cpu_seconds, report, scale
from bench._redis import primary_clients, redis_url
from krules import KRulesContainer
from krules.assembly import apply_gc_policy
from krules.config import Settings
from krules.events import Event
from krules.transport.redis_streams import stream_worker
from krules.transport.stream_client import AsyncStreamClient
from storage.redis import create_redis_storage
from storage.redis._resp_connection import _Link

ORDERS = 5_000
BATCH = 100


def _emit_orders(url: str, prefix: str, orders: int, start: Any) -> None:
    """The client process: wait for the go, then queue every order in batches."""

    async def emit() -> None:
        async with AsyncStreamClient(url, prefix) as client:
            for first in range(0, orders, BATCH):
                await client.emit_batch(
                    [
                        {"type": "order.submitted", "subject": f"order-{i}", "data": {"total": 10}}
                        for i in range(first, min(orders, first + BATCH))
                    ]
                )

    start.wait()
    asyncio.run(emit())


class _Writes:
    """Counts socket writes of the auto-pipelined connections (one per round trip)."""

    def __init__(self) -> None:
        self.count = 0
        self._send = _Link.send
        self._flush = _Link._flush

    def __enter__(self) -> _Writes:
        counter = self
        send, flush = self._send, self._flush

        def counted_send(link: _Link, packed: bytes, count: int = 1) -> Any:
            if not link._waiters:
                counter.count += 1
            return send(link, packed, count)

        def counted_flush(link: _Link) -> None:
            if link._outbox:
                counter.count += 1
            flush(link)

        _Link.send = counted_send  # type: ignore[method-assign]
        _Link._flush = counted_flush  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        _Link.send = self._send  # type: ignore[method-assign]
        _Link._flush = self._flush  # type: ignore[method-assign]


async def _summed(probes: list[Any], measure: Any) -> Any:
    """A server figure summed over every primary."""
    return sum([await measure(probe) for probe in probes])


async def run(url: str, prefix: str, orders: int, partitions: int, replicas: int) -> dict[str, Any]:
    settings = Settings(
        redis_url=url,
        key_prefix=prefix,
        partitions=partitions,
        stream_batch=BATCH,
        stream_block_ms=20,
        redis_wait_replicas=replicas,
    )
    container = KRulesContainer()
    container.settings.override(providers.Object(settings))
    storage = create_redis_storage(url, prefix, partitions=partitions, wait_replicas=replicas)
    container.subject_storage.override(providers.Object(storage))
    order_cascade.build(container)
    engine = container.engine()
    worker = stream_worker(engine, storage)
    latencies: list[float] = []
    done = asyncio.Event()

    def shipped(event: Event) -> None:
        if event.type == "order.shipped":
            root = event
            while root.parent is not None:
                root = root.parent
            latencies.append(time.time() - root.time)
            if len(latencies) == orders:
                done.set()

    engine.event_observers.append(shipped)
    await engine.start()
    apply_gc_policy(settings)  # as krules run does
    probes = await primary_clients(url)
    task = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.2)  # the worker has opened the streams
    start = multiprocessing.Event()
    client = multiprocessing.Process(target=_emit_orders, args=(url, prefix, orders, start))
    client.start()
    commands_before = await _summed(probes, redis_commands)
    cpu_before = await _summed(probes, redis_cpu_seconds)
    usec_before = await _summed(probes, redis_command_usec)
    with _Writes() as writes:
        started = time.perf_counter()
        cpu_started = time.process_time()
        start.set()
        await asyncio.wait_for(done.wait(), timeout=300)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        round_trips = writes.count
    commands = await _summed(probes, redis_commands) - commands_before
    server_cpu = await _summed(probes, redis_cpu_seconds) - cpu_before
    command_usec = await _summed(probes, redis_command_usec) - usec_before
    client.join()
    worker.stop()
    await task
    stored = await storage.get(f"order-{orders - 1}", "status")
    await engine.close()
    for probe in probes:
        await probe.aclose()
    if stored != "shipped":
        raise SystemExit(f"the last order was not stored as shipped: {stored!r}")
    latencies.sort()
    return {
        "orders_per_s": round(orders / elapsed),
        "redis_commands_per_order": round(commands / orders, 2),
        "redis_server_cpu_us_per_order": round(server_cpu / orders * 1e6, 1),
        "redis_command_us_per_order": round(command_usec / orders, 1),
        "round_trips_per_order": round(round_trips / orders, 3),
        "instance_cpu_us_per_order": round(cpu / orders * 1e6, 1),
        "latency_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "latency_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
    }


async def main() -> None:
    orders = max(BATCH, int(ORDERS * scale()))
    partitions = int(os.environ.get("KRULES_PARTITIONS", "1"))
    replicas = int(os.environ.get("KRULES_REDIS_WAIT_REPLICAS", "0"))
    cluster = os.environ.get("BENCH_CLUSTER", "") not in ("", "0")
    results = []
    started = max(replicas, int(os.environ.get("BENCH_REPLICAS", "0")))
    with redis_url(replicas=started, cluster=cluster) as url:
        for attempt in range(3):
            results.append(await run(url, f"bench-streams{attempt}:", orders, partitions, replicas))
    best = sorted(results, key=lambda r: r["orders_per_s"])[len(results) // 2]  # the median run
    report(
        "stream_orders",
        storage="redis cluster streams" if cluster else "redis streams",
        partitions=partitions,
        replicas=started,
        wait_replicas=replicas,
        orders=orders,
        **best,
    )


if __name__ == "__main__":
    asyncio.run(main())
