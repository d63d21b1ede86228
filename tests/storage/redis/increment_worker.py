"""Increment one property many times from a process of its own (driven by test_redis_concurrency).

Usage: ``python increment_worker.py MODE URL KEY_PREFIX COUNT``, where MODE is ``update`` (the
storage's atomic ``update``, what ``use_cache=False`` writes use) or ``subject`` (a cached subject:
``set`` with a callable, then ``store``).  The worker connects, prints ``ready``, waits for a line
on stdin so that every worker starts together, increments ``counter.n`` COUNT times and exits.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from dependency_injector import providers

from krules import KRulesContainer
from storage.redis import create_redis_storage


def increment(n: Any) -> int:
    return (n or 0) + 1


async def main(mode: str, url: str, key_prefix: str, count: int) -> None:
    storage = create_redis_storage(url, key_prefix=key_prefix, partitions=2)
    await storage.check()
    container = KRulesContainer()
    container.subject_storage.override(providers.Object(storage))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    for _ in range(count):
        if mode == "update":
            await storage.update("counter", "n", increment)
        else:
            subject = container.subject("counter")
            await subject.set("n", increment)
            await subject.store()
    await storage.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
