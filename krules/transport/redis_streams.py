"""Redis mode's entry points: streams to send to a deployment, and a worker to run an engine on it.

:func:`connect_streams` is for a process outside the deployment (a client, the CLI), :func:`stream_worker`
puts an engine in Redis mode.  The streams themselves are :mod:`krules.transport.redis_transport`'s,
re-exported here with the partition figures of :mod:`krules.transport.redis_status`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from krules.errors import ConfigurationError
from krules.transport.redis_leases import PartitionLeases, default_instance_name
from krules.transport.redis_status import PartitionStatus
from krules.transport.redis_transport import RedisStreams, StreamReceipt
from krules.transport.worker import PartitionWorker
from storage.redis import RedisStorage

if TYPE_CHECKING:
    from krules.engine import Engine

__all__ = [
    "PartitionStatus",
    "RedisStreams",
    "StreamReceipt",
    "connect_streams",
    "stream_worker",
]


async def connect_streams(storage: RedisStorage) -> RedisStreams:
    """Streams for sending from outside an instance, with the partition count recorded in Redis.

    Raises ConfigurationError when no instance has recorded a partition count under the
    storage's key prefix yet (nothing would read the events).
    """
    if await storage.recorded_partitions() is None:
        raise ConfigurationError(
            f"No krules instance has started on this Redis under key prefix {storage.keys.prefix!r} "
            "(no partition count is recorded); start one first, or check KRULES_REDIS_URL and "
            "KRULES_KEY_PREFIX."
        )
    await storage.layout()
    return RedisStreams(storage, count_checked=True)


def stream_worker(engine: Engine, storage: RedisStorage) -> PartitionWorker:
    """Put ``engine`` in Redis mode: its root events go to the partition streams (its transport), and
    the returned worker reads the partitions this instance owns: a share of them
    (``KRULES_PARTITION_ID=auto``, the default) or the ids asked for, each under a lease
    (:mod:`krules.transport.redis_leases`)."""
    settings = engine.settings
    leases = PartitionLeases(
        storage,
        name=settings.consumer or default_instance_name(),
        wanted=settings.static_partitions,
        lease_ms=settings.lease_ms,
        renew_ms=settings.lease_renew_ms,
    )
    streams = RedisStreams(
        storage,
        leases=leases,
        claim_idle_ms=settings.claim_idle_ms,
        block_timeout=settings.stream_block_ms / 1000,
        max_backlog=settings.max_stream_backlog,
    )
    engine.transport = streams
    return PartitionWorker(engine, streams)
