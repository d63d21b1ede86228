"""The commands the Redis storage and the stream transport send, on either kind of connection.

:class:`RedisCommands` is the protocol; :class:`ConnectionCommands` sends the commands on a
:class:`~storage.redis._resp_connection.MultiplexedConnection` (auto-pipelined, owned by the storage),
:class:`ClientCommands` on a redis-py (or fakeredis) client passed in by the user.  Replies may
carry ``bytes`` or ``str`` (a client passed in decides).

Stream reads (``XREADGROUP``, ``XAUTOCLAIM``) on a client come back undecoded, whatever the client's
``decode_responses``: an entry's value that is not UTF-8 must reach the worker as ``bytes``, to be
refused there, rather than make the read itself raise (the connection's RESP parser gives ``bytes``
for such a value too).

A multiplexed connection must never carry a blocking command (one slow reply holds back every
reply queued behind it), so blocking stream reads go to :meth:`RedisCommands.blocking`: a second
connection of its own for commands made from a URL, the client itself (a pool) otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.client import NEVER_DECODE

from storage.redis._resp_connection import Arg, Command, MultiplexedConnection

__all__ = ["ClientCommands", "ConnectionCommands", "RedisCommands", "text"]


def text(value: str | bytes) -> str:
    """A key, field or value of a reply as ``str`` (a client passed in may reply with ``bytes``)."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RedisCommands(Protocol):
    """The commands the Redis storage sends; replies may carry ``bytes`` or ``str``."""

    @property
    def cluster(self) -> bool:
        """Whether keys of different slots live on different nodes (a Redis Cluster): then no one
        command may name keys of two slots (see :mod:`storage.redis.cluster`)."""
        ...

    async def hgetall(self, key: str) -> dict[Any, Any]:
        """``HGETALL``: the hash as a dict."""
        ...

    async def hget(self, key: str, field: str) -> Any:
        """``HGET``: one field, or None."""
        ...

    async def evalsha(self, sha: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """``EVALSHA``: run a loaded script; raise its error (``NoScriptError`` when not loaded)."""
        ...

    async def evalsha_many(self, sha: str, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]) -> list[Any]:
        """Run a script once per ``(keys, args)`` in one round trip; raise the first error."""
        ...

    async def evalsha_replicated(
        self, sha: str, keys: Sequence[str], args: Sequence[Arg], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        """``EVALSHA`` then ``WAIT replicas timeout_ms`` on the same connection, in one round trip
        (on a Redis Cluster: the node serving the keys' slot); return the script's reply and the
        number of replicas that acknowledged every write made on that connection so far.  Raise the
        script's error (then nothing is waited for)."""
        ...

    async def delete(self, key: str) -> None:
        """``DEL`` one key."""
        ...

    async def scan(self, cursor: int, match: str, count: int) -> tuple[int, list[Any]]:
        """``SCAN``: the next cursor and a page of keys."""
        ...

    async def load_scripts(self, sources: Sequence[str]) -> None:
        """``SCRIPT LOAD`` each source, in one round trip."""
        ...

    async def ping(self) -> None:
        """``PING``."""
        ...

    async def execute(self, *args: Arg) -> Any:
        """Any command; return its reply or raise its error."""
        ...

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Several commands in one round trip; return their replies, or raise the first error."""
        ...

    async def execute_many_replicated(
        self, commands: Sequence[Command], replicas: int, timeout_ms: int
    ) -> tuple[list[Any], int]:
        """:meth:`execute_many`, then ``WAIT replicas timeout_ms`` on each connection they went to
        (on one server, in the same round trip); return the replies and the fewest replicas that
        acknowledged them on any node."""
        ...

    def blocking(self, timeout: float) -> RedisCommands:
        """Commands fit for blocking reads of up to ``timeout`` seconds (see the module docstring)."""
        ...

    async def aclose(self) -> None:
        """Release what these commands opened (a client passed in stays open)."""
        ...


def connection_options(
    parsed: Mapping[str, Any], *, connect_timeout: float, socket_timeout: float
) -> dict[str, Any]:
    """redis-py connection options for the fast connection: the URL's ``parsed`` options win over the
    timeouts given; no retry inside redis-py (retrying is the storage's policy); RESP2 (what
    ``_Link`` reads)."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "retry": Retry(NoBackoff(), 0),
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": socket_timeout,
    }
    options.update(parsed)
    options["protocol"] = 2
    return options


def blocking_options(options: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``options`` with a socket timeout long enough for blocking reads of up to ``timeout`` s."""
    return {**options, "socket_timeout": max(options.get("socket_timeout") or 0.0, timeout + 5.0)}


class ConnectionCommands:
    """The storage's commands on a :class:`MultiplexedConnection` (which this object owns)."""

    cluster: Final = False

    def __init__(self, connection: MultiplexedConnection, options: dict[str, Any] | None = None) -> None:
        self.connection: Final = connection
        self._execute = connection.execute
        self._options = options

    @classmethod
    def from_url(cls, url: str, *, connect_timeout: float, socket_timeout: float) -> ConnectionCommands:
        """Commands on a connection to ``url`` (opened on first use); ``ValueError`` for a bad URL.

        Options in the URL's query string win over the timeouts given here, as with redis-py's
        ``from_url``.  redis-py does not retry on its own: retrying is the storage's policy.
        """
        options = connection_options(
            parse_url(url), connect_timeout=connect_timeout, socket_timeout=socket_timeout
        )
        # The pool only makes the connection (TLS, AUTH, SELECT as the URL says); it lends none.
        return cls._open(options)

    @classmethod
    def _open(cls, options: dict[str, Any]) -> ConnectionCommands:
        pool = aioredis.ConnectionPool(**options)
        connection = MultiplexedConnection(pool.make_connection, reply_timeout=options["socket_timeout"])
        return cls(connection, options)

    def blocking(self, timeout: float) -> ConnectionCommands:
        if self._options is None:
            raise TypeError("these commands were not made from a URL; pass a client for blocking reads")
        return self._open(blocking_options(self._options, timeout))

    async def hgetall(self, key: str) -> dict[Any, Any]:
        flat = await self._execute("HGETALL", key)
        pairs = iter(flat)
        return dict(zip(pairs, pairs, strict=True))

    async def hget(self, key: str, field: str) -> Any:
        return await self._execute("HGET", key, field)

    async def evalsha(self, sha: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        return await self._execute("EVALSHA", sha, len(keys), *keys, *args)

    async def evalsha_many(self, sha: str, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]) -> list[Any]:
        if len(calls) == 1:
            keys, args = calls[0]
            return [await self.evalsha(sha, keys, args)]
        return await self.connection.execute_many(
            [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        )

    async def evalsha_replicated(
        self, sha: str, keys: Sequence[str], args: Sequence[Arg], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        reply, acknowledged = await self.connection.replies(
            [("EVALSHA", sha, len(keys), *keys, *args), ("WAIT", replicas, timeout_ms)]
        )
        return _replicated(reply, acknowledged)

    async def delete(self, key: str) -> None:
        await self._execute("DEL", key)

    async def scan(self, cursor: int, match: str, count: int) -> tuple[int, list[Any]]:
        next_cursor, page = await self._execute("SCAN", cursor, "MATCH", match, "COUNT", count)
        return int(next_cursor), page

    async def load_scripts(self, sources: Sequence[str]) -> None:
        await self.connection.execute_many([("SCRIPT", "LOAD", source) for source in sources])

    async def ping(self) -> None:
        await self._execute("PING")

    async def execute(self, *args: Arg) -> Any:
        return await self._execute(*args)

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        return await self.connection.execute_many(commands)

    async def execute_many_replicated(
        self, commands: Sequence[Command], replicas: int, timeout_ms: int
    ) -> tuple[list[Any], int]:
        replies = await self.connection.execute_many([*commands, ("WAIT", replicas, timeout_ms)])
        return replies[:-1], int(replies[-1])

    async def aclose(self) -> None:
        await self.connection.aclose()


def _replicated(reply: Any, acknowledged: Any) -> tuple[Any, int]:
    """A script's reply and its ``WAIT``'s count; the script's error (else the wait's) raised."""
    if isinstance(reply, Exception):
        raise reply
    if isinstance(acknowledged, Exception):
        raise acknowledged
    return reply, int(acknowledged)


_UNDECODED: Final = frozenset({"XREADGROUP", "XAUTOCLAIM"})
_NEVER_DECODE: Final[dict[str, Any]] = {NEVER_DECODE: True}


def _options(command: Command) -> dict[str, Any]:
    """redis-py's options for ``command``: stream reads undecoded (see the module docstring)."""
    return _NEVER_DECODE if command[0] in _UNDECODED else {}


class ClientCommands:
    """The storage's commands on a redis-py (or fakeredis) client, which stays the caller's."""

    cluster: Final = False

    def __init__(self, client: aioredis.Redis) -> None:
        self.client: Final = client

    def server_url(self) -> str:
        """Name the server the client talks to, as a URL without credentials."""
        kwargs = self.client.connection_pool.connection_kwargs
        if kwargs.get("path"):
            return f"unix://{kwargs['path']}"
        return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"

    async def hgetall(self, key: str) -> dict[Any, Any]:
        return await self.client.hgetall(key)

    async def hget(self, key: str, field: str) -> Any:
        return await self.client.hget(key, field)

    async def evalsha(self, sha: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        return await self.client.evalsha(sha, len(keys), *keys, *args)

    async def evalsha_many(self, sha: str, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]) -> list[Any]:
        if len(calls) == 1:
            keys, args = calls[0]
            return [await self.evalsha(sha, keys, args)]
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def evalsha_replicated(
        self, sha: str, keys: Sequence[str], args: Sequence[Arg], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        pipe = self.client.pipeline(transaction=False)  # one connection of the pool for both
        pipe.evalsha(sha, len(keys), *keys, *args)
        pipe.execute_command("WAIT", replicas, timeout_ms)
        reply, acknowledged = await pipe.execute(raise_on_error=False)
        return _replicated(reply, acknowledged)

    async def delete(self, key: str) -> None:
        await self.client.delete(key)

    async def scan(self, cursor: int, match: str, count: int) -> tuple[int, list[Any]]:
        next_cursor, page = await self.client.scan(cursor, match=match, count=count)
        return int(next_cursor), list(page)

    async def load_scripts(self, sources: Sequence[str]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for source in sources:
            pipe.script_load(source)
        await pipe.execute()

    async def ping(self) -> None:
        await self.client.ping()

    async def execute(self, *args: Arg) -> Any:
        return await self.client.execute_command(*args, **_options(args))  # type: ignore[no-untyped-call]

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command, **_options(command))
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def execute_many_replicated(
        self, commands: Sequence[Command], replicas: int, timeout_ms: int
    ) -> tuple[list[Any], int]:
        replies = await self.execute_many([*commands, ("WAIT", replicas, timeout_ms)])  # one connection
        return replies[:-1], int(replies[-1])

    def blocking(self, timeout: float) -> ClientCommands:
        return self  # a client's pool lends a connection per command: blocking is fine

    async def aclose(self) -> None:
        return None
