"""The Redis subject storage: ``create_redis_storage(url=..., key_prefix=...)``.

:mod:`storage.redis.store` is the storage itself, :mod:`storage.redis.keys` the key schema,
:mod:`storage.redis.scripts` the Lua scripts of ``lua/``, :mod:`storage.redis.commands` the command
layer with its retry policy, and :mod:`storage.redis._resp_connection` the private auto-pipelined
connection it runs on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage.redis.store import RedisStorage, create_redis_storage

if TYPE_CHECKING:
    from krules.config import Settings

__all__ = ["RedisStorage", "create_redis_storage", "storage_from_settings"]


def storage_from_settings(settings: Settings, **options: Any) -> RedisStorage:
    """The storage of a deployment's settings (``KRULES_REDIS_URL``, ``KRULES_KEY_PREFIX``,
    ``KRULES_PARTITIONS``, ``KRULES_DEDUPE_WINDOW``); ``options`` go to :func:`create_redis_storage`.
    This is the driver :mod:`krules.assembly` picks for ``redis``, ``rediss`` and ``unix`` URLs."""
    return create_redis_storage(
        url=settings.redis_url,
        key_prefix=settings.key_prefix,
        partitions=settings.partitions,
        dedupe_window=float(settings.dedupe_window),
        **options,
    )
