"""Fixtures shared by the whole test tree."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from krules.testing.redis_cluster import LocalRedisCluster
from krules.testing.redis_sentinel import LocalRedisSentinel
from krules.testing.redis_server import LocalRedisServer, find_redis_server

# -- real redis-server -------------------------------------------------------------------------
# Integration tests run against a real redis-server that the session starts on a free loopback
# port (no persistence, its own temporary directory) and stops at the end.  Without redis-server
# those tests skip, loudly (see the report header), except under CI=true, where they fail.

_REDIS_MISSING = (
    "redis-server is not installed, so the real-Redis tests cannot run; install it with "
    "`make redis-server` (Debian package redis-server)"
)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def pytest_report_header(config: pytest.Config) -> str:
    executable = find_redis_server()
    if executable is not None:
        return f"redis-server: {executable}"
    verdict = "they FAIL under CI=true" if _ci() else "those tests are SKIPPED"
    return f"redis-server: NOT FOUND; {verdict} ({_REDIS_MISSING})"


def _redis_server_executable() -> str:
    executable = find_redis_server()
    if executable is None:
        if _ci():
            pytest.fail(f"{_REDIS_MISSING}; CI=true requires them.", pytrace=False)
        pytest.skip(_REDIS_MISSING)
    return executable


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisServer]:
    """The session's redis-server; tests share it, so each uses its own key prefix."""
    server = LocalRedisServer(tmp_path_factory.mktemp("redis-server"), executable=_redis_server_executable())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_key_prefix() -> str:
    """A key prefix no other test uses, to share the session's server without interference."""
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def raw(redis_server: LocalRedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client on the session's server (replies decoded), to look at or write what
    krules reads and writes from another connection, as another service would."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., LocalRedisServer]]:
    """Start private redis-servers (to crash, restart, stop or protect with a password).

    ``redis_server_factory(persistent=True, password="...")`` returns a started server; every
    server it started is stopped when the test ends.
    """
    executable = _redis_server_executable()
    servers: list[LocalRedisServer] = []

    def start(**options: Any) -> LocalRedisServer:
        server = LocalRedisServer(tmp_path / f"redis-{len(servers)}", executable=executable, **options)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop(kill=True)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """The session's Redis Cluster (3 primaries, 3 replicas, on loopback); tests share it, so each
    uses its own key prefix, and none kills its nodes (a test that does starts its own)."""
    cluster = LocalRedisCluster(
        tmp_path_factory.mktemp("redis-cluster"), executable=_redis_server_executable()
    )
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_factory(tmp_path: Path) -> Iterator[Callable[..., LocalRedisCluster]]:
    """Start private Redis Clusters (to kill a primary in); stopped when the test ends."""
    executable = _redis_server_executable()
    clusters: list[LocalRedisCluster] = []

    def start(**options: Any) -> LocalRedisCluster:
        cluster = LocalRedisCluster(tmp_path / f"cluster-{len(clusters)}", executable=executable, **options)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


@pytest.fixture
def redis_sentinel_factory(tmp_path: Path) -> Iterator[Callable[..., LocalRedisSentinel]]:
    """Start private Sentinel-managed Redis setups (a primary, its replica, 3 sentinels) to fail
    over; stopped when the test ends."""
    executable = _redis_server_executable()
    setups: list[LocalRedisSentinel] = []

    def start(**options: Any) -> LocalRedisSentinel:
        setup = LocalRedisSentinel(tmp_path / f"sentinel-{len(setups)}", executable=executable, **options)
        setups.append(setup)
        try:
            setup.start()
        except BaseException:
            setup.stop()
            raise
        return setup

    yield start
    for setup in setups:
        setup.stop()
