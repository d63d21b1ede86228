"""What ``krules partitions`` shows: each partition's stream, pending entries, lag and owners.

Read from Redis by any process (no partition needs to be owned): the partition count recorded by the
first instance, the instances hash each running instance refreshes, and per partition its lease,
``XLEN`` and ``XINFO`` of its stream and consumer group.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from krules.transport.redis_replies import fields, flat_map, group_info, text
from storage.redis import RedisStorage
from storage.redis.keys import CONSUMER_GROUP, lease_epoch, lease_holder

__all__ = ["PartitionStatus", "live_instances", "partition_status"]

_DEFAULT_LEASE_MS = 10_000
"""The lease time of a registration that does not say (``KRULES_LEASE_MS``' default)."""


class PartitionStatus(dict[str, Any]):
    """One partition's figures for ``krules partitions`` (a dict: partition, length, pending, lag,
    last_delivered, consumers, owner (None, or instance, epoch, lease_left_ms, lease_age_ms, seen),
    owners (the owner as a list, as earlier builds had it), waiting)."""


async def partition_status(storage: RedisStorage) -> list[PartitionStatus]:
    """Every partition's stream length, pending entries, lag, consumers, owner (from its lease: the
    instance, its epoch, the lease's age and time left) and the live instances waiting for it (none
    when no instance has recorded a partition count under the storage's key prefix)."""
    keys, commands = storage.keys, storage.commands
    count_raw = await storage.run(
        partial(commands.execute, "GET", keys.partition_count()), "read the partition count"
    )
    if count_raw is None:
        return []
    partitions = int(text(count_raw))
    registered, live = await _registrations(storage)
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
        lease, ttl = await storage.run(
            partial(commands.execute_many, [("GET", keys.lease(p)), ("PTTL", keys.lease(p))]),
            "read the lease of partition %d",
            p,
        )
        owner = _owner(None if lease is None else text(lease), int(ttl), registered)
        group = group_info(groups) or {}
        out.append(
            PartitionStatus(
                partition=p,
                length=int(length),
                pending=int(group.get("pending", 0) or 0),
                lag=None if group.get("lag") is None else int(group["lag"]),
                last_delivered=text(group.get("last-delivered-id", "-")),
                consumers=[flat_map(c) for c in consumers or ()],
                owner=owner,
                owners=[] if owner is None else [{"consumer": owner["instance"], "seen": owner["seen"]}],
                waiting=sorted(
                    name
                    for name, info in registered.items()
                    if name in live
                    and info.get("mode") == "static"
                    and p in (info.get("wants") or ())
                    and (owner is None or owner["instance"] != name)
                ),
            )
        )
    return out


async def live_instances(storage: RedisStorage) -> list[dict[str, Any]]:
    """The live instances' registrations (refreshed within their lease time), sorted by name: each a
    dict with ``name``, ``mode`` (``auto`` or ``static``), ``wants`` (static ids) and ``seen`` (ms)."""
    registered, live = await _registrations(storage)
    return [
        {
            "name": name,
            "mode": registered[name].get("mode", "auto"),
            "wants": list(registered[name].get("wants") or ()),
            "seen": registered[name].get("seen"),
        }
        for name in sorted(live)
    ]


async def _registrations(storage: RedisStorage) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Every registration in the instances hash, and the names of the live ones (refreshed within
    their lease time, on the server's clock: a stopped instance's registration lingers a while)."""
    keys, commands = storage.keys, storage.commands
    instances, clock = await storage.run(
        partial(commands.execute_many, [("HGETALL", keys.instances()), ("TIME",)]), "read the instances"
    )
    now = int(text(clock[0])) * 1000 + int(text(clock[1])) // 1000
    registered: dict[str, dict[str, Any]] = {}
    live: set[str] = set()
    for name, raw in (fields(instances) or {}).items():
        try:
            info = json.loads(raw)
        except ValueError:
            continue
        if isinstance(info, dict):
            registered[name] = info
            seen, lease_ms = info.get("seen"), info.get("lease_ms", _DEFAULT_LEASE_MS)
            if isinstance(seen, int) and isinstance(lease_ms, int) and now - seen <= lease_ms:
                live.add(name)
    return registered, live


def _owner(lease: str | None, ttl_ms: int, registered: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A partition's owner from its lease ``<epoch>:<instance>:<nonce>`` and the lease's time left."""
    if lease is None:
        return None
    instance = lease_holder(lease)
    try:
        epoch: int | None = lease_epoch(lease)
    except ValueError:  # not written by krules: shown as it is, without an epoch
        epoch = None
    info = registered.get(instance, {})
    lease_ms = info.get("lease_ms")
    left = max(ttl_ms, 0)
    return {
        "instance": instance,
        "epoch": epoch,
        "lease_left_ms": left,
        "lease_age_ms": None if not isinstance(lease_ms, int) else max(lease_ms - left, 0),
        "seen": info.get("seen"),
    }
