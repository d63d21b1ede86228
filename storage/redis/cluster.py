"""The storage's commands on a Redis Cluster: each command sent to the primary serving its key's slot.

Chosen by a ``redis+cluster://[user:password@]host:port[,host:port...][/][?options]`` URL
(``rediss+cluster://`` for TLS): the nodes named are where the cluster's map of slots is first asked
for (``CLUSTER SLOTS``); one is enough, more survive one being down.  Options of the query string are
those of a ``redis://`` URL and apply to every node; a cluster has only database 0.

* **Routing.** A command goes to the node serving the slot of its key (the key's CRC16, or of the
  text of its first ``{...}`` hash tag: redis-py's :func:`redis.crc.key_slot`); krules never sends a
  command over keys of two slots.  Commands without a key (``TIME``, ``PING``) go to any primary.
* **Pipelining per node.** Each node has one auto-pipelined connection
  (:class:`~storage.redis._resp_connection.MultiplexedConnection`, as a single server has); several
  commands (:meth:`ClusterCommands.execute_many`) are split by node, sent to all nodes at once and
  their replies put back in order.  Commands to one node keep their order; commands to different
  nodes are independent (callers that need "this before that" across slots send them in turn).
* **Redirects.** A ``MOVED`` reply updates the slot's node, marks the map for a refresh and the
  command is sent again to the right node; an ``ASK`` reply (a slot being migrated) sends
  ``ASKING`` and the command to the node named, once.  After five redirects in a row the command
  fails with a sentence naming the slot and the nodes.
* **Failures.** A node that cannot be reached (or times out) fails its commands with
  :class:`ClusterNodeError` naming the node and the slot, and the map is refreshed before the next
  command: after a failover, the replica promoted in its place is found there.  Retrying is the
  storage's business (:mod:`storage.redis.errors`), as on a single server.
* **Scripts and scans.** ``SCRIPT LOAD`` goes to every primary (a ``NOSCRIPT`` reply from one, e.g.
  a replica just promoted, makes the storage load them everywhere again); ``SCAN`` walks every
  primary in turn, its cursor carrying the node's index (:meth:`ClusterCommands.scan`).
* **Blocking reads** (:meth:`ClusterCommands.blocking`) get connections of their own, sharing the
  map of slots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.redis._resp_connection import Arg, Command, MultiplexedConnection
from storage.redis.commands import blocking_options, connection_options

__all__ = ["CLUSTER_SCHEMES", "ClusterCommands", "ClusterNodeError", "ClusterRedirectError", "slot_of"]

CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")
"""URL schemes naming a Redis Cluster (the second with TLS)."""

Address = tuple[str, int]

_REDIRECTS: Final = 5
_KEYLESS: Final = frozenset({"PING", "TIME", "SCRIPT", "INFO", "CLUSTER", "WAIT", "DBSIZE", "ECHO"})
_SCRIPT_CALLS: Final = frozenset({"EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL", "FCALL_RO"})
_STREAM_READS: Final = frozenset({"XREAD", "XREADGROUP"})
_SUBCOMMAND_KEYED: Final = frozenset({"XGROUP", "XINFO", "OBJECT"})


class ClusterNodeError(RedisConnectionError):
    """Raised when a Redis Cluster node cannot be reached or does not answer in time."""

    def __init__(self, node: Address, slot: int | None, cause: Exception) -> None:
        serving = f", serving slot {slot}," if slot is not None else ""
        super().__init__(f"Redis Cluster node {node[0]}:{node[1]}{serving} failed: {cause}")
        self.node = node
        self.slot = slot


class ClusterRedirectError(ResponseError):
    """Raised when a slot is redirected between nodes more times in a row than a migration takes."""


def slot_of(command: Command) -> int | None:
    """The slot of ``command``'s key (None for a command without one)."""
    name = command[0]
    name = name.upper() if isinstance(name, str) else str(name).upper()
    if name in _SCRIPT_CALLS:
        key = command[3] if len(command) > 3 and int(command[2]) > 0 else None
    elif name in _STREAM_READS:
        at = next(
            (i for i, arg in enumerate(command) if isinstance(arg, str) and arg.upper() == "STREAMS"), -1
        )
        key = command[at + 1] if 0 <= at < len(command) - 1 else None
    elif name in _SUBCOMMAND_KEYED:
        key = command[2] if len(command) > 2 else None
    elif name in _KEYLESS or len(command) < 2:
        key = None
    else:
        key = command[1]
    if key is None:
        return None
    if isinstance(key, str):
        return key_slot(key.encode())
    if isinstance(key, bytes):
        return key_slot(key)
    return key_slot(str(key).encode())


def parse_cluster_url(url: str) -> tuple[list[Address], dict[str, Any]]:
    """The seed nodes and the connection options of a ``redis+cluster://`` URL; ValueError when bad."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"the scheme must be one of {', '.join(CLUSTER_SCHEMES)}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, not {unquote(path.strip('/'))!r}")
    credentials, _, hosts = netloc.rpartition("@")
    seeds: list[Address] = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon:
            host, port = port, "6379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} is not a host:port")
        seeds.append((host, int(port)))
    base = "rediss" if scheme.lower() == "rediss+cluster" else "redis"
    at = f"{credentials}@" if credentials else ""
    options: dict[str, Any] = dict(
        parse_url(f"{base}://{at}{seeds[0][0]}:{seeds[0][1]}/0" + (f"?{query}" if query else ""))
    )
    options.pop("db", None)
    return seeds, options


@dataclass
class _Topology:
    """The cluster's map of slots, shared by a storage's commands and their blocking readers."""

    seeds: list[Address]
    slots: list[Address | None] = field(default_factory=lambda: [None] * REDIS_CLUSTER_HASH_SLOTS)
    primaries: list[Address] = field(default_factory=list)
    stale: bool = True
    generation: int = 0
    lock: asyncio.Lock | None = None


class ClusterCommands:
    """:class:`~storage.redis.commands.RedisCommands` on a Redis Cluster (see the module docstring)."""

    cluster: Final = True

    def __init__(self, seeds: list[Address], options: dict[str, Any], *, topology: _Topology | None = None):
        self._options = options
        self._topology = topology if topology is not None else _Topology(seeds)
        self._nodes: dict[Address, MultiplexedConnection] = {}

    @classmethod
    def from_url(cls, url: str, *, connect_timeout: float, socket_timeout: float) -> ClusterCommands:
        """Commands on the cluster ``url`` names (nothing is sent before the first call); ValueError
        for a bad URL.  Options of the URL win over the timeouts given here."""
        seeds, parsed = parse_cluster_url(url)
        options = connection_options(parsed, connect_timeout=connect_timeout, socket_timeout=socket_timeout)
        return cls(seeds, options)

    def blocking(self, timeout: float) -> ClusterCommands:
        options = blocking_options(self._options, timeout)
        return ClusterCommands(self._topology.seeds, options, topology=self._topology)

    # -- the storage's commands ----------------------------------------------------------------

    async def hgetall(self, key: str) -> dict[Any, Any]:
        flat = await self.execute("HGETALL", key)
        pairs = iter(flat)
        return dict(zip(pairs, pairs, strict=True))

    async def hget(self, key: str, field: str) -> Any:
        return await self.execute("HGET", key, field)

    async def evalsha(self, sha: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def evalsha_many(self, sha: str, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]) -> list[Any]:
        return await self.execute_many([("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls])

    async def evalsha_replicated(
        self, sha: str, keys: Sequence[str], args: Sequence[Arg], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        """The script and its ``WAIT`` on the node serving the keys' slot, in one write; after a
        redirect both go again, to the node named (a ``WAIT`` counts what its own node wrote)."""
        script: Command = ("EVALSHA", sha, len(keys), *keys, *args)
        wait: Command = ("WAIT", replicas, timeout_ms)
        slot = slot_of(script)
        topology = self._topology
        asked: Address | None = None
        for _ in range(_REDIRECTS + 1):
            if topology.stale:
                await self._refresh(topology.generation)
            node = asked or self._node_of(slot)
            reply, acknowledged = await self._on_node(node, [script, wait], slot, asking=asked is not None)
            asked = None
            if isinstance(reply, MovedError):
                topology.slots[reply.slot_id] = reply.node_addr
                topology.stale = True
            elif isinstance(reply, AskError):
                asked = reply.node_addr
            else:
                if isinstance(reply, ClusterDownError):
                    topology.stale = True
                    raise reply
                if isinstance(reply, Exception):
                    raise reply
                if isinstance(acknowledged, Exception):
                    raise acknowledged
                return reply, int(acknowledged)
        raise ClusterRedirectError(
            f"Redis Cluster slot {slot} was redirected {_REDIRECTS + 1} times in a row; check the "
            "cluster with redis-cli --cluster check, a slot migration may be stuck"
        )

    async def delete(self, key: str) -> None:
        await self.execute("DEL", key)

    async def scan(self, cursor: int, match: str, count: int) -> tuple[int, list[Any]]:
        """``SCAN`` every primary in turn: ``cursor`` is the node's cursor times the number of
        primaries plus the node's index (0 to start, 0 when every node is done)."""
        primaries = sorted(await self._primaries())
        nodes = len(primaries)
        index, node_cursor = cursor % nodes, cursor // nodes
        node = primaries[index]
        (reply,) = await self._on_node(node, [("SCAN", node_cursor, "MATCH", match, "COUNT", count)], None)
        if isinstance(reply, Exception):
            raise reply
        next_cursor, page = int(reply[0]), reply[1]
        if next_cursor:
            return next_cursor * nodes + index, page
        return (index + 1 if index + 1 < nodes else 0), page

    async def load_scripts(self, sources: Sequence[str]) -> None:
        loads: list[Command] = [("SCRIPT", "LOAD", source) for source in sources]
        primaries = await self._primaries()
        results = await asyncio.gather(*(self._on_node(node, loads, None) for node in primaries))
        for replies in results:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply

    async def ping(self) -> None:
        primaries = await self._primaries()
        for replies in await asyncio.gather(*(self._on_node(node, [("PING",)], None) for node in primaries)):
            if isinstance(replies[0], Exception):
                raise replies[0]

    async def execute(self, *args: Arg) -> Any:
        (reply,) = await self._send([args])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        replies = await self._send(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def execute_many_replicated(
        self, commands: Sequence[Command], replicas: int, timeout_ms: int
    ) -> tuple[list[Any], int]:
        """The commands, then a ``WAIT`` on each node serving their slots now (after redirects)."""
        replies = await self.execute_many(commands)
        nodes = {self._node_of(slot_of(command)) for command in commands}
        waits = await asyncio.gather(
            *(self._on_node(node, [("WAIT", replicas, timeout_ms)], None) for node in nodes)
        )
        fewest = replicas
        for (acknowledged,) in waits:
            if isinstance(acknowledged, Exception):
                raise acknowledged
            fewest = min(fewest, int(acknowledged))
        return replies, fewest

    async def aclose(self) -> None:
        nodes, self._nodes = self._nodes, {}
        for connection in nodes.values():
            await connection.aclose()

    # -- routing -------------------------------------------------------------------------------

    async def _send(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` to the nodes serving their slots; replies in order, errors as values."""
        topology = self._topology
        if topology.stale:
            await self._refresh(topology.generation)
        replies: list[Any] = [None] * len(commands)
        slots = [slot_of(command) for command in commands]
        todo = list(range(len(commands)))
        asked: dict[int, Address] = {}
        for _ in range(_REDIRECTS + 1):
            groups: dict[tuple[Address, bool], list[int]] = {}
            for i in todo:
                target = asked.get(i)
                node = target or self._node_of(slots[i])
                groups.setdefault((node, target is not None), []).append(i)
            if len(groups) == 1:
                ((node, asking), members) = next(iter(groups.items()))
                results: list[Any] = [await self._on_group(node, asking, commands, members, slots)]
            else:
                results = await asyncio.gather(
                    *(
                        self._on_group(node, asking, commands, members, slots)
                        for (node, asking), members in groups.items()
                    )
                )
            todo = []
            asked.clear()
            for (_, members), group_replies in zip(groups.items(), results, strict=True):
                for i, reply in zip(members, group_replies, strict=True):
                    if isinstance(reply, MovedError):
                        topology.slots[reply.slot_id] = reply.node_addr
                        topology.stale = True
                        todo.append(i)
                    elif isinstance(reply, AskError):
                        asked[i] = reply.node_addr
                        todo.append(i)
                    else:
                        if isinstance(reply, ClusterDownError | ClusterNodeError):
                            topology.stale = True
                        replies[i] = reply
            if not todo:
                return replies
        for i in todo:
            replies[i] = ClusterRedirectError(
                f"Redis Cluster slot {slots[i]} was redirected {_REDIRECTS + 1} times in a row (last "
                f"to {self._node_of(slots[i])[0]}:{self._node_of(slots[i])[1]}); check the cluster with "
                "redis-cli --cluster check, a slot migration may be stuck"
            )
        return replies

    async def _on_group(
        self,
        node: Address,
        asking: bool,
        commands: Sequence[Command],
        members: list[int],
        slots: list[int | None],
    ) -> list[Any]:
        sent = [commands[i] for i in members]
        slot = slots[members[0]]
        try:
            return await self._on_node(node, sent, slot, asking=asking)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            failed = exc if isinstance(exc, ClusterNodeError) else ClusterNodeError(node, slot, exc)
            return [failed] * len(sent)

    async def _on_node(
        self, node: Address, commands: Sequence[Command], slot: int | None, *, asking: bool = False
    ) -> list[Any]:
        """Send ``commands`` to ``node`` in one write (each after ``ASKING`` when ``asking``)."""
        connection = self._nodes.get(node)
        if connection is None:
            connection = self._nodes[node] = self._connect(node)
        try:
            if not asking:
                return await connection.replies(commands)
            sent: list[Command] = []
            for command in commands:
                sent += (("ASKING",), command)
            return (await connection.replies(sent))[1::2]
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._topology.stale = True
            raise ClusterNodeError(node, slot, exc) from None

    def _connect(self, node: Address) -> MultiplexedConnection:
        options = {**self._options, "host": node[0], "port": node[1]}
        pool = aioredis.ConnectionPool(**options)
        return MultiplexedConnection(pool.make_connection, reply_timeout=options["socket_timeout"])

    def _node_of(self, slot: int | None) -> Address:
        topology = self._topology
        if slot is not None:
            node = topology.slots[slot]
            if node is not None:
                return node
        return topology.primaries[0] if topology.primaries else topology.seeds[0]

    async def _primaries(self) -> list[Address]:
        topology = self._topology
        if topology.stale or not topology.primaries:
            await self._refresh(topology.generation)
        return list(topology.primaries)

    async def _refresh(self, generation: int) -> None:
        """Read the map of slots from the first node that answers (known primaries, then the seeds);
        only one refresh at a time, and none when another finished since ``generation``."""
        topology = self._topology
        if topology.lock is None:
            topology.lock = asyncio.Lock()
        async with topology.lock:
            if topology.generation != generation and not topology.stale:
                return
            tried: list[str] = []
            failure: Exception | None = None
            candidates = list(dict.fromkeys([*topology.primaries, *topology.seeds]))
            for node in candidates:
                try:
                    (reply,) = await self._on_node(node, [("CLUSTER", "SLOTS")], None)
                except ClusterNodeError as exc:
                    tried.append(f"{node[0]}:{node[1]}")
                    failure = exc
                    continue
                if isinstance(
                    reply, Exception
                ):  # e.g. not a cluster node: ERR This instance has cluster support disabled
                    tried.append(f"{node[0]}:{node[1]}")
                    failure = reply
                    continue
                self._apply(node, reply)
                return
            if isinstance(failure, ResponseError) and "cluster support disabled" in str(failure):
                raise ResponseError(
                    f"{tried[-1]} is a single Redis server, not a Redis Cluster node; "
                    "use a redis:// URL for it"
                )
            raise RedisConnectionError(
                f"no node of the Redis Cluster answered CLUSTER SLOTS (tried {', '.join(tried)}; "
                f"last: {failure})"
            )

    def _apply(self, asked: Address, reply: list[Any]) -> None:
        topology = self._topology
        slots: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        primaries: list[Address] = []
        for row in reply:
            start, end, primary = int(row[0]), int(row[1]), row[2]
            host = primary[0] if isinstance(primary[0], str) and primary[0] not in ("", "?") else asked[0]
            node = (host, int(primary[1]))
            if node not in primaries:
                primaries.append(node)
            slots[start : end + 1] = [node] * (end - start + 1)
        topology.slots = slots
        topology.primaries = primaries
        topology.stale = False
        topology.generation += 1
