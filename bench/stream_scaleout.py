"""Redis mode scaled out: 20,000 prefilled orders drained by 1, then 2 instances in ``auto``.

The partition streams of a throwaway redis-server (``KRULES_PARTITIONS``, default 8) are filled with
``order.submitted`` events (the cascade of :mod:`bench.order_cascade`: 5 events, 1 turn per order),
then instances are started as processes of their own (engine + partition worker, no middleware,
``KRULES_PARTITION_ID=auto``, default lease settings).  Reported, for 1 and for 2 instances:

* ``drain_s`` and ``orders_per_s``: from starting the instances to the last order committed
  (counted by the partitions' processed-id sets), start-up and the instances sharing the
  partitions out included;
* ``balanced_s``: from starting the instances to every partition being owned and the shares even
  (what a new instance waits for its share);

and the handover time: with 2 instances owning half each, one is stopped with SIGTERM and
``handover_s`` is the time until the other owns every partition.  Both instances share this
machine's cores with redis-server and with each other.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections import Counter
from typing import Any

import redis

from bench._common import report, scale
from bench._redis import redis_url
from krules.transport.stream_client import AsyncStreamClient
from storage.redis.keys import KeySchema, lease_holder

ORDERS = 20_000
BATCH = 100


def _instance(url: str, prefix: str, name: str) -> None:
    """One instance: the order cascade on the partition streams, until SIGTERM."""
    from bench import order_cascade
    from krules.assembly import apply_gc_policy, assemble
    from krules.config import Settings

    async def main() -> None:
        settings = Settings(
            redis_url=url, key_prefix=prefix, consumer=name, stream_batch=BATCH, stream_block_ms=20
        )
        instance = assemble(settings, middleware=False)
        order_cascade.build(instance.container)
        worker = instance.worker
        assert worker is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.stop)
        await instance.engine.start()
        apply_gc_policy(instance.settings)  # as krules run does
        await worker.run()
        await instance.engine.close()

    asyncio.run(main())


async def _prefill(url: str, prefix: str, orders: int, partitions: int) -> None:
    keys = KeySchema(prefix, partitions)
    with redis.Redis.from_url(url) as client:
        client.set(keys.partition_count(), partitions)
    async with AsyncStreamClient(url, prefix) as sender:
        for first in range(0, orders, BATCH):
            await sender.emit_batch(
                [
                    {"type": "order.submitted", "subject": f"order-{i}", "data": {"total": 10}}
                    for i in range(first, min(orders, first + BATCH))
                ]
            )


def _owners(client: redis.Redis, keys: KeySchema) -> Counter[str]:
    """How many partitions each instance owns (by its name in the lease), "" for the unowned."""
    pipe = client.pipeline(transaction=False)
    for p in range(keys.partitions):
        pipe.get(keys.lease(p))
    owners: Counter[str] = Counter()
    for raw in pipe.execute():
        owners["" if raw is None else lease_holder(raw.decode())] += 1
    return owners


def _balanced(owners: Counter[str], instances: int, partitions: int) -> bool:
    shares = sorted(n for name, n in owners.items() if name)
    fair = {partitions // instances, -(-partitions // instances)}
    return not owners[""] and len(shares) == instances and set(shares) <= fair


def _committed(client: redis.Redis, keys: KeySchema) -> int:
    pipe = client.pipeline(transaction=False)
    for p in range(keys.partitions):
        pipe.zcard(keys.processed(p))
    return sum(pipe.execute())


def _start(url: str, prefix: str, name: str) -> multiprocessing.Process:
    process = multiprocessing.Process(target=_instance, args=(url, prefix, name), name=name)
    process.start()
    return process


def _stop(*processes: multiprocessing.Process) -> None:
    for process in processes:
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    for process in processes:
        process.join(60)


def drain(url: str, prefix: str, orders: int, partitions: int, instances: int) -> dict[str, Any]:
    asyncio.run(_prefill(url, prefix, orders, partitions))
    keys = KeySchema(prefix, partitions)
    client = redis.Redis.from_url(url)
    started = time.perf_counter()
    processes = [_start(url, prefix, f"bench-{instances}-{n}") for n in range(instances)]
    balanced = None
    try:
        while True:
            now = time.perf_counter()
            if balanced is None and _balanced(_owners(client, keys), instances, partitions):
                balanced = now - started
            if _committed(client, keys) >= orders:
                elapsed = now - started
                break
            if now - started > 600:
                raise SystemExit("the instances did not drain the streams within 10 minutes")
            time.sleep(0.01)
        while balanced is None and time.perf_counter() - started < 60:
            if _balanced(_owners(client, keys), instances, partitions):
                balanced = time.perf_counter() - started
            time.sleep(0.01)
        handover = None
        if instances == 2:
            leaving = processes[1]
            stopped = time.perf_counter()
            os.kill(leaving.pid or 0, signal.SIGTERM)
            while time.perf_counter() - stopped < 60:
                if _owners(client, keys)[processes[0].name] == partitions:
                    handover = round(time.perf_counter() - stopped, 2)
                    break
                time.sleep(0.01)
    finally:
        _stop(*processes)
        client.close()
    figures: dict[str, Any] = {
        "drain_s": round(elapsed, 2),
        "orders_per_s": round(orders / elapsed),
        "balanced_s": None if balanced is None else round(balanced, 2),
    }
    if instances == 2:
        figures["handover_s"] = handover
    return figures


def main() -> None:
    orders = max(BATCH, int(ORDERS * scale()))
    partitions = int(os.environ.get("KRULES_PARTITIONS", "8"))
    with redis_url() as url:
        for instances in (1, 2):
            figures = drain(url, f"bench-scaleout{instances}:", orders, partitions, instances)
            report(
                "stream_scaleout",
                instances=instances,
                partitions=partitions,
                orders=orders,
                partition_id="auto",
                **figures,
            )


if __name__ == "__main__":
    main()
