"""``krules partitions``: a Redis-mode deployment's partitions, their owners (instance, lease epoch,
lease age and time left), the instances waiting for them, stream lengths, pending entries and lag,
read straight from Redis (so it works whether or not an instance runs).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

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


async def _partition_status(settings: Settings) -> tuple[str, list[PartitionStatus], list[dict[str, Any]]]:
    from krules.transport.redis_status import live_instances
    from krules.transport.redis_streams import RedisStreams

    storage = redis_storage(settings, retries=2)
    try:
        url: str = storage.url
        return url, await RedisStreams(storage).status(), await live_instances(storage)
    finally:
        await storage.close()


def _with_shares(instances: list[dict[str, Any]], partitions: list[PartitionStatus]) -> list[dict[str, Any]]:
    """The live instances, each with the partitions it owns (``owns``)."""
    owned: dict[str, list[int]] = {}
    for p in partitions:
        if p["owner"] is not None:
            owned.setdefault(p["owner"]["instance"], []).append(p["partition"])
    return [{**instance, "owns": owned.get(instance["name"], [])} for instance in instances]


def command_partitions(args: argparse.Namespace) -> int:
    """``krules partitions``: the partition count, owners, leases, waiting instances, stream lengths,
    pending entries and lag."""
    settings = settings_from_env()
    configure_quiet_logging(settings)
    require_redis(settings, "partitions")
    url, partitions, live = asyncio.run(_partition_status(settings))
    instances = _with_shares(live, partitions)
    if args.json:
        say_json({"key_prefix": settings.key_prefix, "partitions": partitions, "instances": instances})
        return 0
    if not partitions:
        raise KRulesError(
            f"No krules instance has started on {url} under key prefix {settings.key_prefix!r} "
            "(no partition count is recorded)."
        )
    say(f"{len(partitions)} partition(s) under key prefix {settings.key_prefix!r} on {url}")
    rows = []
    for p in partitions:
        owner = p["owner"]
        consumers = ", ".join(
            f"{c.get('name')} ({c.get('pending', 0)} pending, idle {int(c.get('idle', 0)) / 1000:.0f}s)"
            for c in p["consumers"]
        )
        lag = "?" if p["lag"] is None else p["lag"]
        rows.append(
            [
                p["partition"],
                p["length"],
                p["pending"],
                lag,
                "-" if owner is None else owner["instance"],
                "-" if owner is None or owner["epoch"] is None else owner["epoch"],
                _lease(owner),
                ", ".join(p["waiting"]) or "-",
                consumers or "-",
            ]
        )
    headers = ["PARTITION", "LENGTH", "PENDING", "LAG", "OWNER", "EPOCH", "LEASE", "WAITING", "CONSUMERS"]
    print(format_table(headers, rows))
    if instances:
        say(
            "instances: "
            + ", ".join(
                f"{i['name']} ({len(i['owns'])} owned"
                + (f", asks for {','.join(map(str, i['wants']))}" if i["mode"] == "static" else "")
                + (", standing by" if not i["owns"] else "")
                + ")"
                for i in instances
            )
        )
    return 0


def _lease(owner: dict[str, Any] | None) -> str:
    """A lease's age (time since its last renewal) and time left, e.g. ``renewed 1s ago, 9s left``."""
    if owner is None:
        return "-"
    left = f"{owner['lease_left_ms'] / 1000:.0f}s left"
    age = owner.get("lease_age_ms")
    return left if age is None else f"renewed {age / 1000:.0f}s ago, {left}"
