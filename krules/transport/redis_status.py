"""What ``krules partitions`` shows: each partition's stream, pending entries, lag and owners.

Read from Redis by any process (no partition needs to be owned): the partition count recorded by the
first instance, the instances hash each running instance refreshes, and per partition ``XLEN`` and
``XINFO`` of its stream and consumer group.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from krules.transport.redis_replies import fields, flat_map, group_info, text
from storage.redis import RedisStorage
from storage.redis.keys import CONSUMER_GROUP

__all__ = ["PartitionStatus", "partition_status"]


class PartitionStatus(dict[str, Any]):
    """One partition's figures for ``krules partitions`` (a dict: partition, length, pending, lag,
    last_delivered, consumers, owners)."""


async def partition_status(storage: RedisStorage) -> list[PartitionStatus]:
    """Every partition's stream length, pending entries, lag, consumers and registered owners
    (none when no instance has recorded a partition count under the storage's key prefix)."""
    keys, commands = storage.keys, storage.commands
    count_raw = await storage.run(
        partial(commands.execute, "GET", keys.partition_count()), "read the partition count"
    )
    if count_raw is None:
        return []
    partitions = int(text(count_raw))
    instances = await storage.run(
        partial(commands.execute, "HGETALL", keys.instances()), "read the instances"
    )
    owners: dict[int, list[dict[str, Any]]] = {}
    for name, raw in (fields(instances) or {}).items():
        try:
            info = json.loads(raw)
        except ValueError:
            continue
        for p in info.get("partitions", ()):
            owners.setdefault(int(p), []).append({"consumer": name, "seen": info.get("seen")})
    out: list[PartitionStatus] = []
    for p in range(partitions):
        stream = keys.stream(p)
        try:
            length, groups, consumers = await storage.run(
                partial(
                    commands.execute_many,
                    [
                        ("XLEN", stream),
                        ("XINFO", "GROUPS", stream),
                        ("XINFO", "CONSUMERS", stream, CONSUMER_GROUP),
                    ],
                ),
                "inspect partition %d",
                p,
            )
        except Exception:  # no stream or group yet: nothing was sent to this partition
            length, groups, consumers = 0, [], []
        group = group_info(groups) or {}
        out.append(
            PartitionStatus(
                partition=p,
                length=int(length),
                pending=int(group.get("pending", 0) or 0),
                lag=None if group.get("lag") is None else int(group["lag"]),
                last_delivered=text(group.get("last-delivered-id", "-")),
                consumers=[flat_map(c) for c in consumers or ()],
                owners=owners.get(p, []),
            )
        )
    return out
