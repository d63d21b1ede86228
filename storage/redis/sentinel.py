"""The storage's commands on a Sentinel-managed primary: today's single-server connection, which asks
the sentinels where the primary is each time it connects.

Chosen by a ``redis+sentinel://[user:password@]host:port[,host:port...]/service[?db=N&options]`` URL:
the hosts are sentinels (port 26379 when left out), ``service`` the name they monitor the primary
under (``sentinel monitor <service> ...``).  Credentials and query options are the primary's, as in a
``redis://`` URL; the sentinels are asked without credentials.

* **Where the primary is.** Each connect asks the sentinels in turn (``SENTINEL MASTERS``, through
  redis-py's :class:`redis.asyncio.sentinel.Sentinel`) and connects to the primary they name, with
  the single server's auto-pipelined connection
  (:class:`~storage.redis._resp_connection.MultiplexedConnection`): between failovers it costs
  nothing per command more than a ``redis://`` URL but a check of error replies.
* **Failover.** A lost connection reconnects, asking again; a ``READONLY`` reply (the connection
  still reaches the old primary, now demoted to a replica) drops the connection so that the next
  command asks again.  Both errors are retried by the storage (:mod:`storage.redis.errors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import ReadOnlyError

from storage.redis._resp_connection import Arg, Command, MultiplexedConnection
from storage.redis.commands import ConnectionCommands, connection_options

__all__ = ["SENTINEL_SCHEMES", "SentinelCommands", "parse_sentinel_url"]

SENTINEL_SCHEMES: Final = ("redis+sentinel",)
"""URL schemes naming a Sentinel-managed primary."""

_SENTINEL_PORT: Final = 26379


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """The sentinels, the service and the primary's connection options of a ``redis+sentinel://``
    URL; ValueError when it is not one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"the scheme must be {' or '.join(SENTINEL_SCHEMES)}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    service = unquote(path.strip("/"))
    if not service or "/" in service:
        raise ValueError("the path must be the service name the sentinels monitor, e.g. /mymaster")
    credentials, _, hosts = netloc.rpartition("@")
    sentinels: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon:
            host, port = port, str(_SENTINEL_PORT)
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} is not a sentinel's host:port")
        sentinels.append((host, int(port)))
    params = dict(parse_qsl(query))
    db = params.pop("db", "0")
    if not db.isdigit():
        raise ValueError(f"db must be a database number, not {db!r}")
    at = f"{credentials}@" if credentials else ""
    rebuilt = "&".join(f"{name}={value}" for name, value in params.items())
    options: dict[str, Any] = dict(
        parse_url(f"redis://{at}localhost/{db}" + (f"?{rebuilt}" if rebuilt else ""))
    )
    options.pop("host", None)
    options.pop("port", None)
    return sentinels, service, options


class _FailoverConnection(MultiplexedConnection):
    """A connection that drops itself on a ``READONLY`` reply: the primary it reached was demoted."""

    async def execute(self, *args: Arg) -> Any:
        try:
            return await super().execute(*args)
        except ReadOnlyError:
            self._drop()
            raise

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        try:
            return await super().execute_many(commands)
        except ReadOnlyError:
            self._drop()
            raise

    async def replies(self, commands: Sequence[Command]) -> list[Any]:
        replies = await super().replies(commands)
        if any(isinstance(reply, ReadOnlyError) for reply in replies):
            self._drop()
        return replies

    def _drop(self) -> None:
        link = self._link
        if link is not None:
            link.close()  # the next command connects again, asking the sentinels


class SentinelCommands(ConnectionCommands):
    """:class:`~storage.redis.commands.ConnectionCommands` on the primary the sentinels name (see the
    module docstring)."""

    _sentinel: Sentinel | None = None

    @classmethod
    def from_url(cls, url: str, *, connect_timeout: float, socket_timeout: float) -> SentinelCommands:
        """Commands on the primary of ``url`` (nothing is asked before the first call); ValueError
        for a bad URL.  Options of the URL win over the timeouts given here."""
        sentinels, service, parsed = parse_sentinel_url(url)
        options = connection_options(parsed, connect_timeout=connect_timeout, socket_timeout=socket_timeout)
        options["sentinels"] = sentinels
        options["service_name"] = service
        return cls._open(options)

    @classmethod
    def _open(cls, options: dict[str, Any]) -> SentinelCommands:
        pool_options = dict(options)
        sentinels = pool_options.pop("sentinels")
        service = pool_options.pop("service_name")
        timeouts = {
            "socket_connect_timeout": pool_options["socket_connect_timeout"],
            "socket_timeout": pool_options["socket_connect_timeout"],
        }
        sentinel = Sentinel(sentinels, sentinel_kwargs=timeouts)  # type: ignore[no-untyped-call]
        pool_options["connection_class"] = SentinelManagedConnection
        pool = SentinelConnectionPool(service, sentinel, **pool_options)  # type: ignore[no-untyped-call]
        connection = _FailoverConnection(pool.make_connection, reply_timeout=pool_options["socket_timeout"])
        made = cls(connection, options)
        made._sentinel = sentinel
        return made

    def blocking(self, timeout: float) -> SentinelCommands:
        blocking = super().blocking(timeout)
        if not isinstance(blocking, SentinelCommands):  # not reached: _open makes this class
            raise TypeError(f"unexpected {blocking!r}")
        return blocking

    async def aclose(self) -> None:
        await super().aclose()
        if self._sentinel is not None:
            for client in self._sentinel.sentinels:
                await client.aclose()
