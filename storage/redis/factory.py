"""``create_redis_storage``: a Redis subject storage from a URL or a client, its options checked.

A storage made from a URL sends everything on one auto-pipelined connection of its own
(:mod:`storage.redis._resp_connection`), which does not retry on its own: the retry policy is the
storage's (:mod:`storage.redis.errors`).  A ``redis+cluster://`` URL gives it one such connection
per node of a Redis Cluster (:mod:`storage.redis.cluster`), a ``redis+sentinel://`` URL one to the
primary the sentinels name (:mod:`storage.redis.sentinel`).  A client passed in is used as is.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from krules.errors import ConfigurationError
from storage.redis.cluster import CLUSTER_SCHEMES, ClusterCommands
from storage.redis.commands import ClientCommands, ConnectionCommands, RedisCommands
from storage.redis.errors import reason, redact
from storage.redis.keys import KeySchema
from storage.redis.sentinel import SENTINEL_SCHEMES, SentinelCommands
from storage.redis.store import RedisStorage

__all__ = ["create_redis_client", "create_redis_storage", "is_cluster_url"]

_DEFAULT_URL = "redis://127.0.0.1:6379/0"
_URL_FORMS = (
    "redis://[user:password@]host[:port][/db], rediss://..., unix:///path/to/socket, or "
    "redis+cluster://[user:password@]host:port[,host:port...] for a Redis Cluster, or "
    "redis+sentinel://[user:password@]host:port[,host:port...]/service[?db=N] for a primary Sentinel manages"
)


def create_redis_client(redis_url: str = _DEFAULT_URL, **options: Any) -> aioredis.Redis:
    """Return a ``redis.asyncio`` client for ``redis_url``, as KRules' ``create_redis_client`` does.

    For rule modules ported from KRules, whose setup is
    ``create_redis_storage(redis_client=create_redis_client(url), redis_prefix="app:")``.  KRules'
    function is a coroutine function; this one returns the client at once, and the client is
    awaitable (``await create_redis_client(url)`` gives the same client), so both spellings of the
    KRules setup work.  ``options`` go to ``redis.asyncio.Redis.from_url``.  The client is the
    caller's: close it (``await client.aclose()``) when done.  A storage made from a URL instead
    (``create_redis_storage(url=...)``) uses one auto-pipelined connection and is faster.
    """
    if not isinstance(redis_url, str):
        raise ConfigurationError(f"The Redis URL must be a string, not {redis_url!r}.")
    try:
        return aioredis.Redis.from_url(redis_url, **options)
    except ValueError as exc:
        raise ConfigurationError(
            f"The Redis URL {redact(redis_url)!r} is not valid ({reason(exc)}); use {_URL_FORMS}."
        ) from None


def create_redis_storage(
    url: str | aioredis.Redis | None = None,
    key_prefix: str = "krules:",
    *,
    client: aioredis.Redis | None = None,
    redis_client: aioredis.Redis | None = None,
    redis_prefix: str | None = None,
    partitions: int | None = None,
    retries: int = 8,
    retry_backoff: float = 0.05,
    retry_backoff_cap: float = 2.0,
    update_attempts: int = 50,
    connect_timeout: float = 5.0,
    socket_timeout: float = 30.0,
    dedupe_window: float = 3600.0,
    wait_replicas: int = 0,
    wait_timeout_ms: int = 1000,
) -> RedisStorage:
    """Return a Redis subject storage; nothing is sent to the server before the first call.

    ``url`` defaults to ``redis://127.0.0.1:6379/0``; the storage then opens one auto-pipelined
    connection of its own, used from one event loop.  A ``redis+cluster://host:port[,host:port...]``
    URL (``rediss+cluster://`` with TLS) names a Redis Cluster: one such connection per node, each
    command sent to the node serving its key's slot (:mod:`storage.redis.cluster`).  A
    ``redis+sentinel://host:port[,host:port...]/service[?db=N]`` URL names a primary Sentinel manages:
    the connection asks the sentinels where it is whenever it connects, so it follows a failover
    (:mod:`storage.redis.sentinel`).  Pass ``client``
    to use a client you built (e.g. ``fakeredis.FakeAsyncRedis()``) instead; it is not closed by
    :meth:`RedisStorage.close`, keeps its own retry settings and pool, and ``url`` then only names
    the server in messages.

    ``partitions`` is the deployment's partition count, which decides the hash tag of every subject
    key: leave it out to use the count the deployment recorded in Redis (read once, before the first
    read or write); a count given that differs from the recorded one is refused with a
    ConfigurationError.  When nothing is recorded yet, the first write records the count given (or
    1), and reads use it.  ``retries`` bounds the retries of an operation that cannot reach the server
    (``retry_backoff`` doubling up to ``retry_backoff_cap`` seconds, jittered); ``update_attempts``
    bounds the compare-and-set attempts of callable updates under contention.  ``connect_timeout``
    bounds connecting, ``socket_timeout`` the wait for a reply.  ``dedupe_window`` is how long (in
    seconds) a partition remembers the ids of the events it committed, to drop re-deliveries.

    ``wait_replicas`` (0: off) makes every store-script write (a turn's commit, a batch of
    ``store``) wait until that many replicas of the primary that applied it acknowledged it (``WAIT``
    on the same connection, up to ``wait_timeout_ms``); fewer is retried like a lost connection, then
    reported as StorageUnavailableError.  Redis replicates asynchronously: without it, a write
    acknowledged by a primary that dies before its replica received it is lost in a failover.

    For rule modules ported from KRules, the KRules call works too:
    ``create_redis_storage(redis_client=create_redis_client(url), redis_prefix="app:")`` or with the
    client passed first.  ``redis_client`` is another name for ``client``, ``redis_prefix`` for
    ``key_prefix``; the storage reads and writes the same keys as one made from a URL.
    """
    if redis_client is not None:
        if client is not None:
            raise ConfigurationError("Pass the Redis client as client=... or redis_client=..., not both.")
        client = redis_client
    if url is not None and not isinstance(url, str):
        if client is not None:
            raise ConfigurationError("Pass the Redis client either first or as client=..., not both.")
        url, client = None, url
    if redis_prefix is not None:
        key_prefix = redis_prefix
    keys = KeySchema(key_prefix, 1 if partitions is None else partitions)
    _require_count("retries", retries, 0)
    _require_count("update_attempts", update_attempts, 1)
    _require_count("wait_replicas", wait_replicas, 0)
    _require_count("wait_timeout_ms", wait_timeout_ms, 1)
    for name, value in (
        ("retry_backoff", retry_backoff),
        ("retry_backoff_cap", retry_backoff_cap),
        ("connect_timeout", connect_timeout),
        ("socket_timeout", socket_timeout),
        ("dedupe_window", dedupe_window),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigurationError(f"{name} must be a positive number of seconds, not {value!r}.")
    commands: RedisCommands
    if client is not None:
        if not hasattr(client, "connection_pool"):  # redis-py's RedisCluster has nodes, not one pool
            raise ConfigurationError(
                f"A {type(client).__name__} client cannot be used as the storage's client (it routes "
                "commands itself, and krules' scripts and scans need its own routing); pass the "
                "cluster's URL instead: create_redis_storage('redis+cluster://host:port,...')."
            )
        commands = ClientCommands(client)
        display = redact(url) if url is not None else commands.server_url()
    else:
        url = url if url is not None else _DEFAULT_URL
        display = redact(url)
        scheme = url.partition("://")[0].lower()
        opener: type[ConnectionCommands] | type[ClusterCommands] = (
            ClusterCommands
            if scheme in CLUSTER_SCHEMES
            else SentinelCommands
            if scheme in SENTINEL_SCHEMES
            else ConnectionCommands
        )
        try:
            commands = opener.from_url(url, connect_timeout=connect_timeout, socket_timeout=socket_timeout)
        except ValueError as exc:
            raise ConfigurationError(
                f"The Redis URL {display!r} is not valid ({reason(exc)}); use {_URL_FORMS}."
            ) from None
    return RedisStorage(
        commands,
        keys,
        url=display,
        retries=retries,
        retry_backoff=retry_backoff,
        retry_backoff_cap=retry_backoff_cap,
        update_attempts=update_attempts,
        dedupe_window=dedupe_window,
        partitions_given=partitions is not None,
        wait_replicas=wait_replicas,
        wait_timeout_ms=wait_timeout_ms,
    )


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def _require_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer of at least {minimum}, not {value!r}.")
