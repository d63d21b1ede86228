"""The Redis subject storage: ``create_redis_storage(url=..., key_prefix=...)``.

:mod:`storage.redis.store` is the storage itself, :mod:`storage.redis.keys` the key schema,
:mod:`storage.redis.scripts` the Lua scripts of ``lua/``, :mod:`storage.redis.commands` the command
layer with its retry policy, and :mod:`storage.redis._resp_connection` the private auto-pipelined
connection it runs on.
"""

from storage.redis.store import RedisStorage, create_redis_storage

__all__ = ["RedisStorage", "create_redis_storage"]
