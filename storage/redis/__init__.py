"""The Redis subject storage: ``create_redis_storage(url=..., key_prefix=...)``, or from settings.

KRules' setup, ``create_redis_storage(redis_client=create_redis_client(url), redis_prefix="app:")``,
works too.

:mod:`storage.redis.factory` makes it; :mod:`storage.redis.store` is the storage itself,
:mod:`storage.redis.batches` its store-script calls and conflict handling, :mod:`storage.redis.errors`
its retries and error messages, :mod:`storage.redis.keys` the key schema, :mod:`storage.redis.scripts`
the Lua scripts of ``lua/``, :mod:`storage.redis.commands` the commands on either kind of connection,
and :mod:`storage.redis._resp_connection` the private auto-pipelined connection they run on.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

from storage.redis.factory import create_redis_client, create_redis_storage
from storage.redis.store import RedisStorage

if TYPE_CHECKING:
    from krules.config import Settings

__all__ = [
    "RedisStorage",
    "create_redis_client",
    "create_redis_storage",
    "recorded_partitions",
    "storage_from_settings",
]


def storage_from_settings(settings: Settings, **options: Any) -> RedisStorage:
    """The storage of a deployment's settings (``KRULES_REDIS_URL``, ``KRULES_KEY_PREFIX``,
    ``KRULES_PARTITIONS``, ``KRULES_DEDUPE_WINDOW``, ``KRULES_REDIS_WAIT_REPLICAS``,
    ``KRULES_REDIS_WAIT_TIMEOUT_MS``); ``options`` go to :func:`create_redis_storage`.
    This is the driver :mod:`krules.assembly` picks for ``redis``, ``rediss``, ``unix`` and
    ``redis+cluster`` (``rediss+cluster``) URLs."""
    return create_redis_storage(
        url=settings.redis_url,
        key_prefix=settings.key_prefix,
        partitions=settings.partitions,  # None: the recorded count (resolved on first use)
        dedupe_window=float(settings.dedupe_window),
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
        **options,
    )


def recorded_partitions(settings: Settings) -> int | None:
    """The partition count recorded by the deployment ``settings`` name (None when none is yet),
    read before anything else is built, from any thread, event loop running or not (a short-lived
    connection in a thread of its own).  Raises the storage's one-sentence errors."""
    found: list[int | None] = []
    failed: list[BaseException] = []

    async def read() -> None:
        storage = create_redis_storage(url=settings.redis_url, key_prefix=settings.key_prefix, partitions=1)
        try:
            found.append(await storage.recorded_partitions())
        finally:
            await storage.close()

    def run() -> None:
        try:
            asyncio.run(read())
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="krules-read-partition-count", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return found[0]
