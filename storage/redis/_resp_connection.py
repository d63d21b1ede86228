"""Private fast path: one auto-pipelined RESP2 connection, in place of redis-py's pooled client.

It replaces ``redis.asyncio.Redis`` for a storage made from a URL, because that client spends most
of each command on taking and returning a pooled connection, its lock and its health check.  Here
one long-lived connection is shared by every caller of a storage: a command is written at once when
no reply is awaited, otherwise queued to the end of the event-loop iteration and sent in one write
with the others (auto-pipelining), and replies are matched to callers first in, first out by the
transport's data callback.  Measured: ``bench.redis_orders`` went from 2,281 to 5,228 orders/s
when it came in, and ``bench.stream_orders`` makes 0.055 round trips per order for 8.0 commands
(sources and commands: ``docs/performance.md``).

redis-py still opens the connection (TCP, TLS or Unix socket, AUTH, SELECT, client name, and its
connect errors), with the options of the URL; then the transport is handed to this module's
protocol, which reads RESP2 (the handshake is asked for protocol 2).  That takes three redis-py
internals: a connection's ``_writer`` and ``_host_error()``, and ``BaseParser.parse_error`` (its
table of error codes); the tests in ``tests/storage/redis/test_resp_connection.py`` pin them.

* A lost connection, a reply that does not come within ``reply_timeout`` seconds while one is
  awaited, or a protocol error fails every pending call with redis-py's ``ConnectionError`` (or
  ``TimeoutError``) and closes the socket; the next call reconnects.  Retrying is the caller's
  business (:mod:`storage.redis.errors` says which errors the storage retries).
* Cancelling a caller does not unsend a command it already handed over (only one still waiting for
  the connection to open is dropped): the command is sent, and its reply is read and dropped, so
  the replies of the others stay in step.
* Not for blocking commands or pub/sub: a slow reply holds back every reply queued behind it.

The commands the storage sends over it are in :mod:`storage.redis.commands`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

from redis._parsers import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "ENCODING_ERRORS",
    "Arg",
    "Command",
    "MultiplexedConnection",
    "pack_command",
    "parse_reply",
    "undecoded",
]

Arg = str | bytes | int | float
Command = Sequence[Arg]

_BULK: Final = ord("$")
_ARRAY: Final = ord("*")
_INTEGER: Final = ord(":")
_SIMPLE: Final = ord("+")
_ERROR: Final = ord("-")

# redis-py's mapping of error codes to exceptions (NOSCRIPT -> NoScriptError...), typed here.
_error_for: Callable[[str], RedisError] = BaseParser.parse_error

_hiredis: Any
try:  # the C parser and packer redis-py itself uses when it is installed (a dependency of krules)
    import hiredis as _hiredis
except ImportError:  # pragma: no cover - the pure-Python parser below does the same, slower
    _hiredis = None

ENCODING_ERRORS: Final = "surrogateescape"
"""How the C parser decodes a bulk string that is not UTF-8: each byte that does not decode becomes a
lone surrogate (``U+DC80`` to ``U+DCFF``), which no UTF-8 text holds, so :func:`undecoded` gives the
bytes back."""


# -- RESP2 -------------------------------------------------------------------------------------


def pack_command(args: Command) -> bytes:
    """Encode one command as a RESP array of bulk strings (str as UTF-8, numbers in decimal)."""
    if _hiredis is not None:
        try:
            packed: bytes = _hiredis.pack_command(args if type(args) is tuple else tuple(args))
            return packed
        except TypeError:
            pass  # a bool, or another type: the pure-Python packer names it
    return _pack_command(args)


def _pack_command(args: Command) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is str:  # the usual case first, without isinstance's subclass walk
            data = arg.encode()
        elif type(arg) is int:
            data = b"%d" % arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"A Redis command argument must be str, bytes, int or float, not {arg!r}.")
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    """The buffer ends inside a reply; ``need`` is a lower bound of the buffer length it takes."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


def parse_reply(buf: bytes, pos: int = 0) -> tuple[Any, int]:
    """Parse the RESP2 reply at ``buf[pos:]``; return it and the position after it.

    Bulk strings come back as ``str`` (``bytes`` when they are not UTF-8), error replies as the
    redis-py exception instance for their code (``NoScriptError``, ``ReadOnlyError``...).  Raise
    :class:`_Incomplete` when the reply is cut short, ``InvalidResponse`` (or ``ValueError`` for a
    malformed length) when it is not RESP2.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete(len(buf) + 1)
    kind = buf[pos]
    if kind == _BULK:
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        start = end + 2
        stop = start + size
        if len(buf) < stop + 2:
            raise _Incomplete(stop + 2)
        raw = buf[start:stop]
        try:
            return raw.decode(), stop + 2
        except UnicodeDecodeError:
            return raw, stop + 2
    if kind == _ARRAY:
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        pos = end + 2
        items = []
        for _ in range(count):
            item, pos = parse_reply(buf, pos)
            items.append(item)
        return items, pos
    if kind == _INTEGER:
        return int(buf[pos + 1 : end]), end + 2
    if kind == _SIMPLE:
        return buf[pos + 1 : end].decode(errors="replace"), end + 2
    if kind == _ERROR:
        return _error_for(buf[pos + 1 : end].decode(errors="replace")), end + 2
    raise InvalidResponse(f"Protocol error: unexpected reply {bytes(buf[pos : end + 2])[:40]!r}")


# -- the multiplexed connection ----------------------------------------------------------------


def undecoded(value: str) -> str | bytes:
    """A bulk string as the server holds it: ``value``, or its bytes when the C parser found them
    not UTF-8 (see :data:`ENCODING_ERRORS`); what the pure-Python parser gives directly."""
    if value.isascii():
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", ENCODING_ERRORS)
    return value


class _Link(asyncio.Protocol):
    """One socket's commands in flight: the protocol the transport calls back once connected."""

    def __init__(self, transport: asyncio.Transport, where: str, reply_timeout: float | None) -> None:
        self.loop: Final = asyncio.get_running_loop()
        self.error: RedisError | None = None
        self.lost: Final[asyncio.Future[None]] = self.loop.create_future()
        self._transport = transport
        self._where = where
        self._reply_timeout = reply_timeout
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._outbox: list[bytes] = []
        self._partial = bytearray()
        self._need = 0
        self._reader = (
            None
            if _hiredis is None
            else _hiredis.Reader(
                protocolError=InvalidResponse,
                replyError=_error_for,
                encoding="utf-8",
                errors=ENCODING_ERRORS,
            )
        )
        self._replies = 0  # replies read so far: the watchdog's measure of progress
        self._replies_seen = 0
        self._watchdog: asyncio.TimerHandle | None = None

    def send(self, packed: bytes, count: int = 1) -> list[asyncio.Future[Any]]:
        """Send ``count`` packed commands; return one future per reply (error replies as values).

        On a failed link, the futures hold copies of its error at once.
        """
        create = self.loop.create_future
        waiters = [create() for _ in range(count)]
        if self.error is not None:
            for waiter in waiters:
                waiter.set_result(type(self.error)(*self.error.args))
            return waiters
        if self._waiters:
            # Replies are awaited: coalesce with whatever else this loop iteration sends.
            if not self._outbox:
                self.loop.call_soon(self._flush)
            self._outbox.append(packed)
        else:
            self._transport.write(packed)
            if self._watchdog is None and self._reply_timeout is not None:
                self._replies_seen = self._replies
                self._watchdog = self.loop.call_later(self._reply_timeout, self._watch)
        self._waiters.extend(waiters)
        return waiters

    def close(self) -> None:
        """Fail what is pending and drop the socket now."""
        self._fail(RedisConnectionError(f"Connection to {self._where} closed by the client"))

    # -- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is not None:
            self._read_c(reader, data)
            return
        if self._partial:
            self._partial += data
            if len(self._partial) < self._need:
                return
            data = bytes(self._partial)
            self._partial.clear()
        waiters = self._waiters
        pos, size, read = 0, len(data), 0
        try:
            while pos < size:
                reply, pos = parse_reply(data, pos)
                read += 1
                if not waiters:
                    raise InvalidResponse(f"Protocol error: a reply nobody asked for: {reply!r}")
                waiter = waiters.popleft()
                if not waiter.done():  # a cancelled caller's reply is dropped
                    waiter.set_result(reply)
        except _Incomplete as incomplete:
            self._partial += data[pos:]
            self._need = incomplete.need - pos
        except (InvalidResponse, ValueError) as exc:  # ValueError: a malformed length
            self._fail(RedisConnectionError(f"Unreadable reply from {self._where}: {exc}"))
        self._replies += read

    def _read_c(self, reader: Any, data: bytes) -> None:
        """:meth:`data_received` with the C parser, which keeps a partial reply itself."""
        waiters = self._waiters
        read = 0
        try:
            reader.feed(data)
            reply = reader.gets()
            while reply is not False:
                read += 1
                if not waiters:
                    raise InvalidResponse(f"Protocol error: a reply nobody asked for: {reply!r}")
                waiter = waiters.popleft()
                if not waiter.done():  # a cancelled caller's reply is dropped
                    waiter.set_result(reply)
                reply = reader.gets()
        except (InvalidResponse, ValueError) as exc:
            self._fail(RedisConnectionError(f"Unreadable reply from {self._where}: {exc}"))
        self._replies += read

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"Connection to {self._where} lost: {exc}" if exc else f"Connection closed by {self._where}"
        self._fail(RedisConnectionError(reason))
        if not self.lost.done():
            self.lost.set_result(None)

    # -- internals ---------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._outbox:
            self._transport.write(b"".join(self._outbox))
            self._outbox.clear()

    def _watch(self) -> None:
        """Fail the link when replies are awaited and none came since the previous look."""
        self._watchdog = None
        timeout = self._reply_timeout
        if not self._waiters or self.error is not None or timeout is None:
            return
        if self._replies == self._replies_seen:
            self._fail(RedisTimeoutError(f"Timeout reading from {self._where}: no reply in {timeout} s"))
            return
        self._replies_seen = self._replies
        self._watchdog = self.loop.call_later(timeout, self._watch)

    def _fail(self, error: RedisError) -> None:
        if self.error is None:
            self.error = error
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            self._transport.abort()
        self._outbox.clear()
        self._partial.clear()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(type(error)(*error.args))


class MultiplexedConnection:
    """One connection shared by all callers, auto-pipelined; see the module docstring.

    ``connect`` returns a new, unconnected redis-py connection (e.g. ``pool.make_connection``) set
    up for RESP2; it is called once per event loop, and that connection object is reconnected
    after a failure.  ``reply_timeout`` bounds the wait for a reply (None: wait forever).
    """

    def __init__(
        self, connect: Callable[[], AbstractConnection], *, reply_timeout: float | None = None
    ) -> None:
        self._new_connection = connect
        self._reply_timeout = reply_timeout
        self._connection: AbstractConnection | None = None
        self._connection_loop: asyncio.AbstractEventLoop | None = None
        self._link: _Link | None = None
        self._opening: asyncio.Task[_Link] | None = None

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its reply; raise its error reply or the connection's failure."""
        link = self._link
        if link is None or link.error is not None or link.loop is not asyncio.get_running_loop():
            link = await self._open()
        reply = await link.send(pack_command(args))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Send several commands in one write; return their replies, or raise the first error."""
        link = self._link
        if link is None or link.error is not None or link.loop is not asyncio.get_running_loop():
            link = await self._open()
        waiters = link.send(b"".join(map(pack_command, commands)), len(commands))
        replies = [await waiter for waiter in waiters]
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def replies(self, commands: Sequence[Command]) -> list[Any]:
        """Send several commands in one write; return their replies, error replies as values (a
        Redis Cluster client sorts the redirects out of them); raise the connection's failure."""
        link = self._link
        if link is None or link.error is not None or link.loop is not asyncio.get_running_loop():
            link = await self._open()
        replies = [await waiter for waiter in link.send(b"".join(map(pack_command, commands)), len(commands))]
        for reply in replies:
            if isinstance(reply, RedisConnectionError | RedisTimeoutError):  # the link failed (or LOADING)
                raise reply
        return replies

    async def aclose(self) -> None:
        """Close the connection; pending calls fail.  A later call would connect again."""
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
        link, self._link = self._link, None
        if self._connection_loop is not asyncio.get_running_loop():
            self._connection = None  # opened in another event loop, which alone could close it
            return
        if link is not None:
            link.close()
            await link.lost
        if self._connection is not None:
            await self._connection.disconnect(nowait=True)

    async def _open(self) -> _Link:
        """Connect, or join the connect already under way (shielded: a cancelled caller stops only itself)."""
        opening = self._opening
        if opening is None or opening.get_loop() is not asyncio.get_running_loop():
            opening = self._opening = asyncio.get_running_loop().create_task(self._connect())
            opening.add_done_callback(self._opened)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if opening.cancelled() and caller is not None and not caller.cancelling():
                # aclose() stopped the connect, not this caller's cancellation.
                raise RedisConnectionError("Connection closed by the client while connecting") from None
            raise

    def _opened(self, task: asyncio.Task[_Link]) -> None:
        if self._opening is task:
            self._opening = None
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every caller was cancelled

    async def _connect(self) -> _Link:
        loop = asyncio.get_running_loop()
        old, self._link = self._link, None
        if old is not None and old.loop is loop:
            old.close()
        connection = self._connection
        if connection is None or self._connection_loop is not loop:
            # A connection opened in another event loop cannot be used (nor closed) from this one.
            connection = self._connection = self._new_connection()
            self._connection_loop = loop
        else:
            await connection.disconnect(nowait=True)
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            # redis-py closes the socket after its own errors only: a connect cancelled during the
            # handshake (aclose, the event loop ending) would leave it open.
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            raise
        writer = connection._writer
        if writer is None:
            raise RedisConnectionError(f"Connection to {connection._host_error()} closed while connecting")
        transport = writer.transport
        if not isinstance(transport, asyncio.Transport):
            raise TypeError(f"redis-py gave an unexpected transport {transport!r}.")
        link = _Link(transport, connection._host_error(), self._reply_timeout)
        transport.set_protocol(link)
        if transport.is_closing():
            link.connection_lost(None)
        self._link = link
        return link
