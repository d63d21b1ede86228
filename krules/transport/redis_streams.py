"""Redis mode's entry points: streams to send to a deployment, and a worker to run an engine on it.

:func:`connect_streams` is for a process outside the deployment (a client, the CLI), :func:`stream_worker`
puts an engine in Redis mode.  The streams themselves are :mod:`krules.transport.redis_transport`'s,
re-exported here with the partition figures of :mod:`krules.transport.redis_status`.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from krules.errors import ConfigurationError
from krules.transport.redis_replies import text
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
    "default_consumer",
    "stream_worker",
]


async def connect_streams(storage: RedisStorage) -> RedisStreams:
    """Streams for sending from outside an instance: the partition count is read from Redis.

    Raises ConfigurationError when no instance has recorded a partition count under the
    storage's key prefix yet (nothing would read the events).
    """
    raw = await storage.run(
        partial(storage.commands.execute, "GET", storage.keys.partition_count()),
        "read the partition count",
    )
    if raw is None:
        raise ConfigurationError(
            f"No krules instance has started on this Redis under key prefix {storage.keys.prefix!r} "
            "(no partition count is recorded); start one first, or check KRULES_REDIS_URL and "
            "KRULES_KEY_PREFIX."
        )
    count = int(text(raw))
    if count != storage.keys.partitions:
        storage = storage.with_partitions(count)
    return RedisStreams(storage, count_checked=True)


def default_consumer(partitions: Sequence[int], total: int) -> str:
    """The consumer name of an instance: its host name and the partitions it owns (stable across
    restarts, so a restarted instance takes its own pending entries back at once)."""
    owned = "all" if len(partitions) == total else ".".join(map(str, partitions))
    return f"{socket.gethostname()}-p{owned}"


def stream_worker(engine: Engine, storage: RedisStorage) -> PartitionWorker:
    """Put ``engine`` in Redis mode: its root events go to the partition streams (its transport), and
    the returned worker reads the partitions its settings own (``KRULES_PARTITION_ID``)."""
    settings = engine.settings
    owned = settings.owned_partitions
    streams = RedisStreams(
        storage,
        partitions=owned,
        consumer=settings.consumer or default_consumer(owned, settings.partitions),
        claim_idle_ms=settings.claim_idle_ms,
        block_timeout=settings.stream_block_ms / 1000,
        max_backlog=settings.max_stream_backlog,
    )
    engine.transport = streams
    return PartitionWorker(engine, streams)
