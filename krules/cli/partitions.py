"""``krules partitions``: a Redis-mode deployment's partitions, their owners, stream lengths,
pending entries and lag, read straight from Redis (so it works whether or not an instance runs).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import TYPE_CHECKING

from krules.cli.common import (
    configure_quiet_logging,
    format_table,
    redis_storage,
    require_redis,
    say,
    say_json,
)
from krules.config import Settings
from krules.container import settings_from_env
from krules.errors import KRulesError

if TYPE_CHECKING:
    from krules.transport.redis_streams import PartitionStatus

__all__ = ["command_partitions"]

_STALE_AFTER_MS = 60_000  # an instance not seen for this long is marked as gone


def _ago(ms: float | None, now_ms: float) -> str:
    if ms is None:
        return "?"
    seconds = max(0.0, (now_ms - ms) / 1000)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


async def _partition_status(settings: Settings) -> tuple[str, list[PartitionStatus]]:
    from krules.transport.redis_streams import RedisStreams

    storage = redis_storage(settings, retries=2)
    try:
        url: str = storage.url
        return url, await RedisStreams(storage).status()
    finally:
        await storage.close()


def command_partitions(args: argparse.Namespace) -> int:
    """``krules partitions``: the partition count, owners, stream lengths, pending entries and lag."""
    settings = settings_from_env()
    configure_quiet_logging(settings)
    require_redis(settings, "partitions")
    url, partitions = asyncio.run(_partition_status(settings))
    if args.json:
        say_json({"key_prefix": settings.key_prefix, "partitions": partitions})
        return 0
    if not partitions:
        raise KRulesError(
            f"No krules instance has started on {url} under key prefix {settings.key_prefix!r} "
            "(no partition count is recorded)."
        )
    now_ms = time.time() * 1000
    say(f"{len(partitions)} partition(s) under key prefix {settings.key_prefix!r} on {url}")
    rows = []
    for p in partitions:
        owners = ", ".join(
            f"{o['consumer']} ({'gone' if now_ms - (o['seen'] or 0) > _STALE_AFTER_MS else 'seen'} "
            f"{_ago(o['seen'], now_ms)} ago)"
            for o in p["owners"]
        )
        consumers = ", ".join(
            f"{c.get('name')} ({c.get('pending', 0)} pending, idle {int(c.get('idle', 0)) / 1000:.0f}s)"
            for c in p["consumers"]
        )
        lag = "?" if p["lag"] is None else p["lag"]
        rows.append([p["partition"], p["length"], p["pending"], lag, owners or "-", consumers or "-"])
    print(format_table(["PARTITION", "LENGTH", "PENDING", "LAG", "OWNED BY", "CONSUMERS"], rows))
    return 0
