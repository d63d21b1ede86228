"""Several OS processes incrementing one property on a real redis-server lose no increment."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from krules.testing.redis_server import LocalRedisServer
from storage.redis import create_redis_storage

pytestmark = [pytest.mark.redis_server, pytest.mark.slow]

WORKER = Path(__file__).with_name("increment_worker.py")
PROCESSES = 3
INCREMENTS = 300


def run_workers(mode: str, url: str, key_prefix: str) -> list[int]:
    """Start the workers, release them together once all are connected, return their exit codes."""
    command = [sys.executable, str(WORKER), mode, url, key_prefix, str(INCREMENTS)]
    with contextlib.ExitStack() as stack:
        workers = [
            stack.enter_context(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
            for _ in range(PROCESSES)
        ]
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        return [worker.wait(timeout=90) for worker in workers]


@pytest.mark.parametrize("mode", ["update", "subject"])
async def test_processes_incrementing_one_property_end_with_the_exact_count(
    redis_server: LocalRedisServer, redis_key_prefix: str, mode: str
) -> None:
    exit_codes = await asyncio.to_thread(run_workers, mode, redis_server.url, redis_key_prefix)

    storage = create_redis_storage(redis_server.url, key_prefix=redis_key_prefix, partitions=2)
    assert exit_codes == [0] * PROCESSES
    assert await storage.get("counter", "n") == PROCESSES * INCREMENTS
    await storage.close()
