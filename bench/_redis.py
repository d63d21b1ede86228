"""The Redis server a benchmark talks to: ``KRULES_REDIS_URL`` when set, else a throwaway one."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from krules.errors import KRulesError
from krules.testing.redis_server import LocalRedisServer


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """Yield a Redis URL: ``KRULES_REDIS_URL``, or a redis-server started on a free loopback port.

    The server started here runs without persistence in a temporary directory and is stopped on
    exit; when redis-server is not installed the benchmark exits with one sentence saying so.
    """
    url = os.environ.get("KRULES_REDIS_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="krules-bench-redis-") as directory:
        try:
            server = LocalRedisServer(Path(directory))
            server.start()
        except KRulesError as exc:
            sys.exit(str(exc))
        try:
            yield server.url
        finally:
            server.stop()
