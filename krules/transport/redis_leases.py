"""Which instance owns which partition: leases in Redis, fenced, spread over the live instances.

At most one live instance processes a partition at a time.  Ownership is a lease, the key
``<prefix>{p<p>}:lease`` in the partition's own slot, holding ``<epoch>:<instance>:<nonce>`` and
expiring after ``KRULES_LEASE_MS`` unless its owner renews it (every ``KRULES_LEASE_RENEW_MS``).
The epoch only grows (``lua/acquire.lua``), and the lease as its owner holds it is the *fence*
every write made on behalf of the partition's turns carries: the commit script, the fenced read
and claim of the stream, and the writes to other partitions (which check the epoch against the
newest one published in their own slot, ``lua/fence.lua``).  An instance that lost its lease, paused
by the OS, cut off from Redis or stuck, can therefore not read, claim nor commit anything of the
partition afterwards; its turn is dropped and its new owner runs the entry.

:class:`PartitionLeases` does one instance's part, on a timer (:meth:`PartitionLeases.tend`):

* it registers in the instances hash with the server's clock (``lua/members.lua``): the instances
  seen within one lease time are the live ones;
* it renews the leases it holds; one it finds taken or expired is *lost*;
* it decides which partitions it should own: in ``auto`` mode an even, sticky share of those no
  static instance asks for (each live auto instance gets ``n // m`` or one more; the instances that
  already own more keep the larger shares, so a partition moves only when the balance requires
  it); with static ids (``0,2``, ``all``) exactly those, waiting (and saying so) while another live
  instance owns one;
* it takes free partitions it should own (and publishes the new epoch to every partition's slot
  before anything is read), and hands back those it should not: the caller stops reading them,
  lets their turns finish and commit, then :meth:`PartitionLeases.release` deletes the leases.

A killed instance's leases expire after ``KRULES_LEASE_MS``; a stopped one releases them at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

from krules.errors import ConfigurationError
from krules.transport.redis_replies import text
from storage.redis import RedisStorage
from storage.redis._resp_connection import Command
from storage.redis.keys import lease_epoch, lease_holder
from storage.redis.scripts import LuaScript

__all__ = ["AUTO", "Lease", "Member", "PartitionLeases", "default_instance_name", "fair_shares"]

_log = logging.getLogger("krules.partitions")

AUTO: Final = "auto"

_FORGET_AFTER_LEASES: Final = 30
"""Registrations not refreshed for this many lease times are removed from the instances hash."""


def default_instance_name() -> str:
    """An instance's name unless ``KRULES_CONSUMER`` gives one: host, process id and a random
    suffix, so two instances never share one (not even on one host, nor a restarted one)."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease this instance holds: its value (the fence), epoch, and when it must be renewed by."""

    value: str
    epoch: int
    deadline: float
    """``time.monotonic()`` after which the lease may have expired (renewal sent + lease time)."""


@dataclass(frozen=True, slots=True)
class Member:
    """A live instance, as registered: its name, mode, and the partitions it owns or asks for."""

    name: str
    auto: bool
    wants: tuple[int, ...] = ()
    owns: tuple[int, ...] = ()
    seen: int = 0
    lease_ms: int = 0


def fair_shares(members: Sequence[str], pool: int, owned: dict[str, int]) -> dict[str, int]:
    """How many of ``pool`` partitions each of ``members`` should own: ``pool // m`` each, one more
    for ``pool % m`` of them, those owning most (``owned``) first, then by name, so that the
    shares already taken stay where they are."""
    if not members:
        return {}
    base, extra = divmod(pool, len(members))
    ranked = sorted(members, key=lambda name: (-owned.get(name, 0), name))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(ranked)}


@dataclass
class Tending:
    """What one :meth:`PartitionLeases.tend` changed."""

    acquired: list[int] = field(default_factory=list)
    """Partitions taken: read their pending entries first (after claiming them)."""
    give_back: list[int] = field(default_factory=list)
    """Partitions to stop reading now, drain, then :meth:`PartitionLeases.release`."""


class PartitionLeases:
    """One instance's leases on a deployment's partitions (see the module docstring)."""

    def __init__(
        self,
        storage: RedisStorage,
        *,
        name: str,
        wanted: Sequence[int] | None = None,
        lease_ms: int = 10_000,
        renew_ms: int = 1_000,
    ) -> None:
        """``wanted``: the static partition ids, or None for ``auto``."""
        if renew_ms * 2 > lease_ms:
            raise ConfigurationError(
                f"KRULES_LEASE_MS={lease_ms} must be at least twice KRULES_LEASE_RENEW_MS={renew_ms}, "
                "so that a lease outlives a missed renewal."
            )
        self.storage = storage
        self.keys = storage.keys
        self.name = name
        self.nonce = os.urandom(4).hex()
        self.holder = f"{name}:{self.nonce}"
        """What follows the epoch in this instance's leases."""
        self.wanted: tuple[int, ...] | None = None if wanted is None else tuple(wanted)
        self.lease_ms = lease_ms
        self.renew_every = renew_ms / 1000
        self.held: dict[int, Lease] = {}
        self.draining: set[int] = set()
        """Partitions handed back (or lost) whose turns are not over yet: not taken again until then."""
        self.members: list[Member] = []
        self.waiting_for: dict[int, str] = {}
        """Static mode: partition -> the instance holding it, for those this one waits for."""
        self.acquired_total = 0
        self.released_total = 0
        self.lost_total = 0
        self.observers: list[Callable[[str, int], object]] = []
        """Called with ``("acquired" | "released" | "lost", partition)`` (e.g. to count them)."""
        self._scripts: dict[str, LuaScript] = {
            name: storage.script(name) for name in ("acquire", "renew", "fence", "members")
        }
        self._found_lost: list[int] = []
        self._registered = False
        self._warned_shared_name = False
        self._warned_standby = False

    @property
    def auto(self) -> bool:
        """Whether this instance takes a share of the partitions (``KRULES_PARTITION_ID=auto``)."""
        return self.wanted is None

    def owned(self) -> tuple[int, ...]:
        """The partitions this instance holds and reads (not those being handed back)."""
        return tuple(sorted(p for p in self.held if p not in self.draining))

    def fence(self, partition: int) -> str:
        """The lease this instance holds on ``partition`` ('' when none)."""
        lease = self.held.get(partition)
        return "" if lease is None else lease.value

    # -- one round -----------------------------------------------------------------------------

    async def tend(self, taking: bool = True) -> Tending:
        """Register, renew, rebalance (taking partitions only when ``taking``: not while stopping):
        see the module docstring.  Storage errors propagate (after the leases whose time ran out
        locally are dropped: they may be another's by now)."""
        done = Tending()
        try:
            await self._tend(done, taking)
        except Exception:
            self._expire_locally(done)
            self._found_lost = done.give_back + self._found_lost  # handed back by the next round
            raise
        return done

    async def _tend(self, done: Tending, taking: bool) -> None:
        done.give_back += self._found_lost
        self._found_lost = []
        members = await self._register()
        partitions = self.keys.partitions
        held = dict(self.held)
        sent = time.monotonic()
        commands: list[Command] = [("GET", self.keys.lease(p)) for p in range(partitions)]
        renew = self._scripts["renew"].sha
        for p, lease in held.items():
            commands.append(("EVALSHA", renew, 1, self.keys.lease(p), lease.value, self.lease_ms))
        commands.append(("SET", self.keys.partition_count(), partitions, "NX"))
        replies = await self._run(commands, "renew the partition leases")
        if replies[-1] is not None:  # it was missing: Redis lost its data (restarted without persistence?)
            _log.warning(
                "the deployment's partition count was missing from Redis (restarted without persistence, "
                "or its keys deleted?); recorded it again (%d), and partitions whose leases are gone are "
                "taken again with newer epochs",
                partitions,
            )
        holders = [None if reply is None else text(reply) for reply in replies[:partitions]]
        for (p, lease), reply in zip(held.items(), replies[partitions : partitions + len(held)], strict=True):
            if int(reply[0]) == 1:
                self.held[p] = Lease(lease.value, lease.epoch, sent + self.lease_ms / 1000)
                holders[p] = lease.value
            else:
                holder = text(reply[1]) if len(reply) > 1 else None
                why = f"its lease is held by instance {lease_holder(holder)!r} now" if holder else ""
                self._lose(p, why or "its lease is gone (expired, or Redis lost it)", done)
                holders[p] = holder
        self._expire_locally(done)
        if taking:
            self._rebalance(members, holders, done)
        if done.acquired:
            await self._publish(done.acquired)

    async def _register(self) -> list[Member]:
        info = {
            "nonce": self.nonce,
            "mode": AUTO if self.auto else "static",
            "wants": list(self.wanted or ()),
            "partitions": sorted(self.held),
            "lease_ms": self.lease_ms,
        }
        reply = await self._eval(
            "members",
            [self.keys.instances()],
            [self.name, json.dumps(info), self.nonce, self.lease_ms * _FORGET_AFTER_LEASES, "0"],
            "register this instance",
        )
        now = int(text(reply[0]))
        before = text(reply[1])
        # Another process wrote this name's registration since this one's last round: two live
        # instances share the name (a restart under the same name shows only on the first round).
        if self._registered and before and self.nonce not in before and not self._warned_shared_name:
            self._warned_shared_name = True
            _log.error(
                "another live instance is named %r too; give each instance its own KRULES_CONSUMER "
                "(or leave it unset): their leases stay apart, but krules partitions cannot tell "
                "them apart",
                self.name,
            )
        self._registered = True
        members: list[Member] = []
        for i in range(2, len(reply) - 1, 2):
            member = _member(text(reply[i]), text(reply[i + 1]))
            if member is not None and now - member.seen <= self.lease_ms:
                members.append(member)
        if not any(m.name == self.name for m in members):
            members.append(Member(self.name, self.auto, self.wanted or (), tuple(self.held), now))
        self.members = sorted(members, key=lambda m: m.name)
        return self.members

    def _rebalance(self, members: list[Member], holders: list[str | None], done: Tending) -> None:
        partitions = len(holders)
        mine = {p for p in self.held if p not in self.draining}
        free = [p for p, h in enumerate(holders) if h is None and p not in self.draining and p not in mine]
        if self.wanted is not None:
            want = set(self.wanted)
            take = [p for p in free if p in want]
            waiting = {p: lease_holder(h) for p, h in enumerate(holders) if p in want and p not in mine and h}
            for p, holder in waiting.items():
                if self.waiting_for.get(p) != holder:
                    _log.warning(
                        "waiting for partition %d, owned by instance %r (KRULES_PARTITION_ID=%s asks "
                        "for it; it is taken when that instance stops or its lease expires)",
                        p,
                        holder,
                        ",".join(map(str, self.wanted)),
                    )
            self.waiting_for = waiting
            done.acquired += take
            return
        static = {p for m in members if not m.auto for p in m.wants}
        pool = [p for p in range(partitions) if p not in static]
        autos = [m.name for m in members if m.auto]
        owned: dict[str, int] = {}
        for p in pool:
            value = holders[p]
            if value is not None:
                owner = lease_holder(value)
                owned[owner] = owned.get(owner, 0) + 1
        share = fair_shares(autos, len(pool), owned).get(self.name, 0)
        if share == 0 and len(autos) > len(pool) and not self._warned_standby:
            self._warned_standby = True
            _log.warning(
                "%d instances share %d partition(s): this one stands by, taking over when an owner "
                "stops (the partition count is fixed when a deployment first starts: KRULES_PARTITIONS)",
                len(autos),
                len(pool),
            )
        keep = sorted(p for p in mine if p in pool)
        surplus = sorted(p for p in mine if p not in pool) + keep[share:][::-1]
        if surplus:
            done.give_back += surplus
            self.draining.update(surplus)
            _log.info(
                "handing back partition(s) %s: %d instance(s) share %d partition(s), this one's share is "
                "%d (released once their turns under way are committed)",
                ",".join(map(str, sorted(surplus))),
                len(autos),
                len(pool),
                share,
            )
            return
        room = share - len(keep)
        if room <= 0:
            return
        candidates = [p for p in free if p in pool]
        if candidates:  # start where this instance's rank points, so instances starting together
            rank = autos.index(self.name) if self.name in autos else 0  # take different ones
            start = (rank * max(share, 1)) % len(candidates)
            candidates = candidates[start:] + candidates[:start]
        done.acquired += candidates[:room]

    async def _publish(self, wanted: list[int]) -> None:
        """Take the leases of ``wanted`` (those still free), then make each new epoch known in every
        partition's slot before the partition is read."""
        keys = self.keys
        sha = self._scripts["acquire"].sha
        commands: list[Command] = [
            ("EVALSHA", sha, 2, keys.lease(p), keys.fences(p), p, self.holder, self.lease_ms) for p in wanted
        ]
        sent = time.monotonic()
        replies = await self._run(commands, "take partition leases")
        taken: list[tuple[int, Lease]] = []
        for p, reply in zip(wanted, replies, strict=True):
            if int(reply[0]) == 1:
                value = text(reply[1])
                taken.append((p, Lease(value, lease_epoch(value), sent + self.lease_ms / 1000)))
        fence = self._scripts["fence"].sha
        epochs: list[int] = []
        for p, lease in taken:
            epochs += (p, lease.epoch)
        publish: list[Command] = [
            ("EVALSHA", fence, 1, keys.fences(q), *epochs) for q in range(keys.partitions)
        ]  # one call per slot (its own partition's epoch is there already: raising it is a no-op)
        if epochs:
            await self._run(publish, "publish the new partition epochs")
        wanted.clear()
        for p, lease in taken:
            self.held[p] = lease
            self.waiting_for.pop(p, None)
            wanted.append(p)
            self.acquired_total += 1
            self._notify("acquired", p)

    def _lose(self, partition: int, why: str, done: Tending | None) -> None:
        if self.held.pop(partition, None) is None:
            return
        self.lost_total += 1
        if done is not None:
            done.give_back.append(partition)
        else:
            self._found_lost.append(partition)
        self.draining.add(partition)
        _log.warning(
            "lost partition %d: %s; its turns under way here will not be committed, and its new owner "
            "runs their entries",
            partition,
            why,
        )
        self._notify("lost", partition)

    def _expire_locally(self, done: Tending) -> None:
        """Drop the leases whose renewal could not be confirmed in time: another may own them."""
        now = time.monotonic()
        for p, lease in list(self.held.items()):
            if lease.deadline <= now:
                self._lose(p, "its lease could not be renewed in time (Redis unreachable or slow)", done)

    def lost(self, partition: int) -> None:
        """Record that a fenced call found ``partition``'s lease gone: it is no longer read, and the
        next :meth:`tend` hands it back."""
        self._lose(
            partition, "its lease is no longer this instance's (a fenced read or claim found it)", None
        )

    # -- handing back ------------------------------------------------------------------------

    async def release(self, partitions: Sequence[int]) -> None:
        """Delete the leases of ``partitions`` (those still this instance's), once their turns are
        over; a partition lost meanwhile is only forgotten."""
        ours = [(p, self.held[p]) for p in partitions if p in self.held]
        if ours:
            renew = self._scripts["renew"].sha
            commands: list[Command] = [
                ("EVALSHA", renew, 1, self.keys.lease(p), lease.value, 0) for p, lease in ours
            ]
            await self._run(commands, "release partition leases")
        for p, _ in ours:
            del self.held[p]
            self.released_total += 1
            self._notify("released", p)
        if ours and self.draining.intersection(p for p, _ in ours):
            _log.info("released partition(s) %s", ",".join(str(p) for p, _ in ours))
        self.draining.difference_update(partitions)

    async def leave(self) -> None:
        """Release every lease held and remove this instance's registration (a clean stop)."""
        try:
            await self.release(list(self.held))
        finally:
            await self._eval(
                "members",
                [self.keys.instances()],
                [self.name, "{}", self.nonce, self.lease_ms * _FORGET_AFTER_LEASES, "1"],
                "unregister this instance",
            )

    # -- plumbing ----------------------------------------------------------------------------

    def _notify(self, what: str, partition: int) -> None:
        for observe in self.observers:
            try:
                observe(what, partition)
            except Exception:
                _log.exception("a partition ownership observer failed")

    async def _run(self, commands: list[Command], action: str) -> list[Any]:
        if not commands:
            return []
        replies: list[Any] = await self.storage.run(
            partial(self.storage.commands.execute_many, commands), action
        )
        return replies

    async def _eval(self, script: str, keys: list[str], args: list[Any], action: str) -> Any:
        sha = self._scripts[script].sha
        return await self.storage.run(partial(self.storage.commands.evalsha, sha, keys, args), action)


def _member(name: str, raw: str) -> Member | None:
    try:
        info = json.loads(raw)
        return Member(
            name,
            info.get("mode", AUTO) == AUTO,
            tuple(int(p) for p in info.get("wants") or ()),
            tuple(int(p) for p in info.get("partitions") or ()),
            int(info.get("seen", 0)),
            int(info.get("lease_ms", 0)),
        )
    except (ValueError, TypeError, AttributeError):
        return None
