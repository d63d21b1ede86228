"""The Redis server a benchmark talks to: ``KRULES_REDIS_URL`` when set, else a throwaway one."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
import redis.asyncio as aioredis

from krules.errors import KRulesError
from krules.testing.redis_cluster import LocalRedisCluster
from krules.testing.redis_server import LocalRedisServer
from storage.redis.cluster import parse_cluster_url
from storage.redis.factory import is_cluster_url

_SYNC_TIMEOUT = 30.0


@contextlib.contextmanager
def redis_url(*, replicas: int = 0, cluster: bool = False) -> Iterator[str]:
    """Yield a Redis URL: ``KRULES_REDIS_URL``, or a redis-server started on a free loopback port.

    The server started here runs without persistence in a temporary directory and is stopped on
    exit, with ``replicas`` replicas of its own (in step before the URL is given); ``cluster``
    starts a Redis Cluster of 3 primaries (and ``replicas`` replicas each) instead.  When
    redis-server is not installed the benchmark exits with one sentence saying so.
    """
    url = os.environ.get("KRULES_REDIS_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="krules-bench-redis-") as directory:
        servers: list[LocalRedisServer | LocalRedisCluster] = []
        try:
            if cluster:
                nodes = LocalRedisCluster(Path(directory), primaries=3, replicas=replicas)
                servers.append(nodes)
                nodes.start()
                url = nodes.url
            else:
                server = LocalRedisServer(Path(directory) / "primary")
                servers.append(server)
                server.start()
                url = server.url
                for i in range(replicas):
                    replica = LocalRedisServer(
                        Path(directory) / f"replica-{i}",
                        options=("--replicaof", "127.0.0.1", str(server.port)),
                    )
                    servers.append(replica)
                    replica.start()
                _wait_for_replicas(url, replicas)
            yield url
        except KRulesError as exc:
            sys.exit(str(exc))
        finally:
            for started in reversed(servers):
                started.stop()


def _wait_for_replicas(url: str, replicas: int) -> None:
    deadline = time.monotonic() + _SYNC_TIMEOUT
    with redis.Redis.from_url(url, socket_timeout=5.0) as client:
        while _online(client.info("replication")) < replicas:
            if time.monotonic() > deadline:
                sys.exit(f"the bench's {replicas} replica(s) were not in step within {_SYNC_TIMEOUT:.0f} s.")
            time.sleep(0.05)


def _online(info: dict[str, object]) -> int:
    """Replicas done with their first synchronisation (``INFO replication``: ``state=online``)."""
    return sum(
        1
        for name, value in info.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    )


async def primary_clients(url: str) -> list[aioredis.Redis]:
    """A redis-py client on each primary of ``url`` (the one server, or every primary of a
    cluster), to read the servers' statistics from; the caller closes them."""
    if not is_cluster_url(url):
        return [aioredis.Redis.from_url(url, decode_responses=True)]
    seeds, options = parse_cluster_url(url)
    async with aioredis.Redis(host=seeds[0][0], port=seeds[0][1], decode_responses=True) as seed:
        slots = await seed.execute_command("CLUSTER", "SLOTS")
    primaries = dict.fromkeys((str(row[2][0]) or seeds[0][0], int(row[2][1])) for row in slots)
    password = options.get("password")
    return [
        aioredis.Redis(host=host, port=port, password=password, decode_responses=True)
        for host, port in primaries
    ]
