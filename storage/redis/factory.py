"""``create_redis_storage``: a Redis subject storage from a URL or a client, its options checked.

A storage made from a URL sends everything on one auto-pipelined connection of its own
(:mod:`storage.redis._resp_connection`), which does not retry on its own: the retry policy is the
storage's (:mod:`storage.redis.errors`).  A client passed in is used as is.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from krules.errors import ConfigurationError
from storage.redis.commands import ClientCommands, ConnectionCommands, RedisCommands
from storage.redis.errors import reason, redact
from storage.redis.keys import KeySchema
from storage.redis.store import RedisStorage

__all__ = ["create_redis_storage"]


def create_redis_storage(
    url: str | aioredis.Redis | None = None,
    key_prefix: str = "krules:",
    *,
    client: aioredis.Redis | None = None,
    redis_prefix: str | None = None,
    partitions: int = 1,
    retries: int = 8,
    retry_backoff: float = 0.05,
    retry_backoff_cap: float = 2.0,
    update_attempts: int = 50,
    connect_timeout: float = 5.0,
    socket_timeout: float = 30.0,
    dedupe_window: float = 3600.0,
) -> RedisStorage:
    """Return a Redis subject storage; nothing is sent to the server before the first call.

    ``url`` defaults to ``redis://127.0.0.1:6379/0``; the storage then opens one auto-pipelined
    connection of its own, used from one event loop.  Pass ``client`` to use a client you built
    (e.g. ``fakeredis.FakeAsyncRedis()``) instead; it is not closed by :meth:`RedisStorage.close`,
    keeps its own retry settings and pool, and ``url`` then only names the server in messages.
    ``partitions`` must be the deployment's partition count: it decides the hash tag of every
    subject key.  ``retries`` bounds the retries of an operation that cannot reach the server
    (``retry_backoff`` doubling up to ``retry_backoff_cap`` seconds, jittered); ``update_attempts``
    bounds the compare-and-set attempts of callable updates under contention.  ``connect_timeout``
    bounds connecting, ``socket_timeout`` the wait for a reply.  ``dedupe_window`` is how long (in
    seconds) a partition remembers the ids of the events it committed, to drop re-deliveries.

    For rule modules ported from KRules, ``create_redis_storage(redis_client, redis_prefix="app:")``
    works too: a client passed first is taken as ``client``, ``redis_prefix`` as ``key_prefix``.
    """
    if url is not None and not isinstance(url, str):
        if client is not None:
            raise ConfigurationError("Pass the Redis client either first or as client=..., not both.")
        url, client = None, url
    if redis_prefix is not None:
        key_prefix = redis_prefix
    keys = KeySchema(key_prefix, partitions)
    _require_count("retries", retries, 0)
    _require_count("update_attempts", update_attempts, 1)
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
        commands = ClientCommands(client)
        display = redact(url) if url is not None else commands.server_url()
    else:
        url = url if url is not None else "redis://127.0.0.1:6379/0"
        display = redact(url)
        try:
            commands = ConnectionCommands.from_url(
                url, connect_timeout=connect_timeout, socket_timeout=socket_timeout
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"The Redis URL {display!r} is not valid ({reason(exc)}); use "
                "redis://[user:password@]host[:port][/db], rediss://... or unix:///path/to/socket."
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
    )


def _require_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer of at least {minimum}, not {value!r}.")
