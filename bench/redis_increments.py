"""Concurrent increments of one property from 2 processes on Redis: lost increments and throughput.

Each process increments ``counter.n`` 2,000 times (``BENCH_SCALE`` shrinks that) through

* ``storage.update``: the storage's atomic update, what ``use_cache=False`` writes use;
* ``subject.cached``: a cached subject, ``await s.set("n", lambda n: (n or 0) + 1)`` then
  ``await s.store()`` (KRules 3 loses about 35% of these in its default cached mode).

One JSON line per mode: final and expected count, lost increments, increments/s (all processes
together, from the common start to the last process done).  Run: ``python -m bench.redis_increments``
(uses ``KRULES_REDIS_URL`` or starts its own redis-server).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import sys
import time
import uuid
from multiprocessing.synchronize import Barrier
from typing import Any

from bench._common import report, scale
from bench._redis import redis_url
from storage.redis import create_redis_storage

PROCESSES = int(os.environ.get("BENCH_PROCESSES", "2"))
INCREMENTS = 2000
MODES = ("storage.update", "subject.cached")


def increment(n: Any) -> int:
    return (n or 0) + 1


async def _increment(mode: str, url: str, key_prefix: str, count: int, start: Barrier) -> tuple[float, float]:
    storage = create_redis_storage(url, key_prefix=key_prefix)
    await storage.check()
    if mode == "subject.cached":
        from dependency_injector import providers

        from krules import KRulesContainer

        container = KRulesContainer()
        container.subject_storage.override(providers.Object(storage))
    await asyncio.to_thread(start.wait)
    started = time.monotonic()
    for _ in range(count):
        if mode == "storage.update":
            await storage.update("counter", "n", increment)
        else:
            subject = container.subject("counter")
            await subject.set("n", increment)
            await subject.store()
    finished = time.monotonic()
    await storage.close()
    return started, finished


def _worker(mode: str, url: str, key_prefix: str, count: int, start: Barrier, spans: Any) -> None:
    spans.put(asyncio.run(_increment(mode, url, key_prefix, count, start)))


async def _final_count(url: str, key_prefix: str) -> int:
    storage = create_redis_storage(url, key_prefix=key_prefix)
    final: int = await storage.get("counter", "n")
    await storage.flush("counter")
    await storage.close()
    return final


def run(mode: str, url: str, count: int) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    spans = context.Queue()
    key_prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    workers = [
        context.Process(target=_worker, args=(mode, url, key_prefix, count, start, spans))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    times: list[tuple[float, float]] = []
    while len(times) < PROCESSES:
        try:
            times.append(spans.get(timeout=1.0))
        except queue.Empty:
            if any(worker.exitcode not in (None, 0) for worker in workers):
                for worker in workers:
                    worker.kill()
                sys.exit(f"A {mode} benchmark process failed (see its traceback above).")
    for worker in workers:
        worker.join()
    seconds = max(end for _, end in times) - min(begin for begin, _ in times)
    final = asyncio.run(_final_count(url, key_prefix))
    expected = PROCESSES * count
    report(
        "redis_increments",
        mode=mode,
        processes=PROCESSES,
        increments_per_process=count,
        final=final,
        expected=expected,
        lost=expected - final,
        increments_per_s=round(expected / seconds),
    )


def main() -> None:
    count = max(1, round(INCREMENTS * scale()))
    with redis_url() as url:
        for mode in MODES:
            run(mode, url, count)


if __name__ == "__main__":
    main()
