"""The auto-pipelined connection: RESP2 framing, shared writes, failures, cancellation, reconnects."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

import storage.redis._resp_connection as resp_connection
from krules.testing.redis_server import LocalRedisServer, find_redis_server, free_port
from storage.base import SubjectChanges
from storage.redis import RedisStorage
from storage.redis._resp_connection import (
    MultiplexedConnection,
    _Link,
    pack_command,
    parse_reply,
)
from storage.redis.commands import ConnectionCommands
from storage.redis.keys import KeySchema

ServerFactory = Callable[..., LocalRedisServer]


class FakeTransport(asyncio.Transport):
    """Records what is written; ``abort`` only marks it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


class Connections:
    """A connection factory for :class:`MultiplexedConnection` that keeps what it made."""

    def __init__(self, server: LocalRedisServer) -> None:
        self.server = server
        self.made: list[Connection] = []

    def __call__(self) -> Connection:
        connection = Connection(host="127.0.0.1", port=self.server.port, protocol=2)
        self.made.append(connection)
        return connection

    def spy_on_writes(self) -> list[bytes]:
        """Record every write on the socket the latest connection opened (it must be open)."""
        transport = self.made[-1]._writer.transport  # type: ignore[union-attr]
        writes: list[bytes] = []
        write = transport.write

        def recording(data: bytes) -> None:
            writes.append(bytes(data))
            write(data)

        transport.write = recording  # type: ignore[method-assign]
        return writes


def commands_in(data: bytes) -> int:
    """How many commands a write carries (a command is a RESP array, so the reply parser reads it)."""
    count = pos = 0
    while pos < len(data):
        _, pos = parse_reply(data, pos)
        count += 1
    return count


@pytest.fixture
def connections(redis_server: LocalRedisServer) -> Connections:
    return Connections(redis_server)


@pytest.fixture
async def connection(connections: Connections) -> AsyncIterator[MultiplexedConnection]:
    connection = MultiplexedConnection(connections, reply_timeout=30)
    yield connection
    await connection.aclose()


# -- RESP2 framing -----------------------------------------------------------------------------


def test_commands_are_packed_as_arrays_of_bulk_strings() -> None:
    assert pack_command(("SET", "clé", 12, 1.5, b"\xff")) == (
        b"*5\r\n$3\r\nSET\r\n$4\r\ncl\xc3\xa9\r\n$2\r\n12\r\n$3\r\n1.5\r\n$1\r\n\xff\r\n"
    )
    with pytest.raises(TypeError, match="must be str, bytes, int or float, not True"):
        pack_command(("SET", "k", True))


def test_every_resp2_reply_type_is_parsed() -> None:
    data = b"*4\r\n+OK\r\n:-7\r\n*2\r\n$2\r\n\xc3\xa9\r\n$-1\r\n$2\r\n\xff\xfe\r\n*-1\r\n"

    reply, end = parse_reply(data)

    assert reply == ["OK", -7, ["é", None], b"\xff\xfe"]  # bytes only where UTF-8 fails
    assert parse_reply(data, end) == (None, len(data))


def test_error_replies_become_the_redis_py_exception_of_their_code() -> None:
    assert isinstance(parse_reply(b"-NOSCRIPT No matching script.\r\n")[0], NoScriptError)
    assert isinstance(parse_reply(b"-READONLY You can't write against a replica.\r\n")[0], ReadOnlyError)
    error = parse_reply(b"-ERR unknown command 'NOPE'\r\n")[0]
    assert type(error) is ResponseError and str(error) == "unknown command 'NOPE'"


REPLIES: list[tuple[bytes, Any]] = [
    (b"+PONG\r\n", "PONG"),
    (b"$11\r\nhello world\r\n", "hello world"),
    (b"*2\r\n$1\r\na\r\n*1\r\n:42\r\n", ["a", [42]]),
    (b"$-1\r\n", None),
    (b"$0\r\n\r\n", ""),
]
STREAM = b"".join(data for data, _ in REPLIES)


@pytest.fixture(params=["c", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each link test runs with the C parser (hiredis, when installed) and the pure-Python one."""
    if request.param == "python":
        monkeypatch.setattr(resp_connection, "_hiredis", None)
    elif resp_connection._hiredis is None:
        pytest.skip("hiredis is not installed")
    return str(request.param)


def outcome(waiter: asyncio.Future[Any]) -> Any:
    result = waiter.result()
    return (type(result), str(result)) if isinstance(result, Exception) else result


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
async def test_replies_cut_anywhere_reach_their_callers_in_order(cut: int, parser: str) -> None:
    link = _Link(FakeTransport(), "fake", None)
    waiters = link.send(b"(commands)", len(REPLIES))

    link.data_received(STREAM[:cut])
    link.data_received(STREAM[cut:])

    assert [outcome(waiter) for waiter in waiters] == [value for _, value in REPLIES]


async def test_replies_arriving_one_byte_at_a_time_reach_their_callers(parser: str) -> None:
    link = _Link(FakeTransport(), "fake", None)
    waiters = link.send(b"(commands)", len(REPLIES))

    for i in range(len(STREAM)):
        link.data_received(STREAM[i : i + 1])

    assert [outcome(waiter) for waiter in waiters] == [value for _, value in REPLIES]


async def test_a_command_sent_while_others_await_replies_waits_for_the_end_of_the_iteration() -> None:
    transport = FakeTransport()
    link = _Link(transport, "fake", None)

    link.send(b"first;")
    link.send(b"second;")
    link.send(b"third;")
    assert transport.written == [b"first;"]  # an idle link writes at once
    await asyncio.sleep(0)

    assert transport.written == [b"first;", b"second;third;"]


@pytest.mark.parametrize(
    ("garbage", "answered"),
    [(b"?what\r\n", False), (b"$abc\r\n", False), (b"+OK\r\n+OK\r\n", True)],
    ids=["unknown-type", "bad-length", "reply-nobody-asked-for"],
)
async def test_a_reply_that_is_not_resp2_or_not_asked_for_fails_the_link(
    garbage: bytes, answered: bool, parser: str
) -> None:
    transport = FakeTransport()
    link = _Link(transport, "fake", None)
    waiter = link.send(b"PING")[0]

    link.data_received(garbage)

    assert transport.aborted
    assert isinstance(link.error, RedisConnectionError)
    assert waiter.result() == "OK" if answered else isinstance(waiter.result(), RedisConnectionError)


# -- on a real server: shared round trips --------------------------------------------------------


@pytest.mark.redis_server
async def test_commands_issued_while_one_is_in_flight_share_one_write(
    connection: MultiplexedConnection, connections: Connections, redis_key_prefix: str
) -> None:
    await connection.execute("PING")
    writes = connections.spy_on_writes()

    counts = await asyncio.gather(*(connection.execute("INCR", f"{redis_key_prefix}n") for _ in range(10)))

    assert sorted(counts) == list(range(1, 11))
    assert [commands_in(data) for data in writes] == [1, 9]  # the first at once, the others together


@pytest.mark.redis_server
async def test_concurrent_loads_and_stores_of_many_subjects_share_round_trips(
    connections: Connections, raw: aioredis.Redis, redis_key_prefix: str
) -> None:
    storage = RedisStorage(
        ConnectionCommands(MultiplexedConnection(connections)),
        KeySchema(redis_key_prefix, 4),
        url="redis://test",
        retries=0,
        retry_backoff=0.01,
        retry_backoff_cap=0.01,
        update_attempts=5,
    )
    names = [f"order-{i}" for i in range(50)]
    await storage.check()
    await storage.store([SubjectChanges(name, {"n": str(i)}) for i, name in enumerate(names)])
    writes = connections.spy_on_writes()
    await raw.config_resetstat()

    loaded = await asyncio.gather(*(storage.load(name) for name in names))
    await asyncio.gather(*(storage.store([SubjectChanges(name, {"seen": "true"})]) for name in names))

    assert loaded == [({"n": i}, {}) for i in range(50)]
    assert [commands_in(data) for data in writes] == [1, 49, 1, 49]
    stats = await raw.info("commandstats")
    assert stats["cmdstat_hgetall"]["calls"] == 50 and stats["cmdstat_evalsha"]["calls"] == 50
    assert await storage.load("order-7") == ({"n": 7, "seen": True}, {})
    await storage.close()


@pytest.mark.redis_server
async def test_a_batch_of_commands_goes_out_in_one_write_and_raises_its_first_error(
    connection: MultiplexedConnection, connections: Connections, redis_key_prefix: str
) -> None:
    await connection.execute("PING")
    writes = connections.spy_on_writes()
    key = f"{redis_key_prefix}k"

    assert await connection.execute_many([("SET", key, "1"), ("INCR", key), ("GET", key)]) == ["OK", 2, "2"]
    with pytest.raises(NoScriptError):
        await connection.execute_many([("INCR", key), ("EVALSHA", "0" * 40, 0), ("INCR", key)])

    assert [commands_in(data) for data in writes] == [3, 3]
    assert await connection.execute("GET", key) == "4"  # the commands around the error still ran


@pytest.mark.redis_server
async def test_an_error_reply_is_raised_to_its_caller_only(
    connection: MultiplexedConnection, redis_key_prefix: str
) -> None:
    outcomes = await asyncio.gather(
        connection.execute("SET", f"{redis_key_prefix}k", "v"),
        connection.execute("EVALSHA", "0" * 40, 0),
        connection.execute("GET", f"{redis_key_prefix}k"),
        return_exceptions=True,
    )

    assert outcomes[0] == "OK" and isinstance(outcomes[1], NoScriptError) and outcomes[2] == "v"


# -- on a real server: failures, cancellation, reconnects ---------------------------------------


@pytest.mark.redis_server
async def test_a_dropped_connection_fails_every_pending_call_and_the_next_call_reconnects(
    connection: MultiplexedConnection, raw: aioredis.Redis, redis_key_prefix: str
) -> None:
    client_id = await connection.execute("CLIENT", "ID")
    blocked = asyncio.create_task(connection.execute("BLPOP", f"{redis_key_prefix}empty", 0))
    queued = asyncio.create_task(connection.execute("PING"))
    await asyncio.sleep(0)

    await raw.client_kill_filter(_id=client_id)

    for call in (blocked, queued):
        with pytest.raises(RedisConnectionError):
            await call
    assert await connection.execute("PING") == "PONG"
    assert await connection.execute("CLIENT", "ID") != client_id


@pytest.mark.redis_server
async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_others(
    connection: MultiplexedConnection, raw: aioredis.Redis, redis_key_prefix: str
) -> None:
    queue = f"{redis_key_prefix}queue"
    await connection.execute("PING")  # connected: the calls below are sent as soon as they are made
    blocked = asyncio.create_task(connection.execute("BLPOP", queue, 0))
    behind = asyncio.create_task(connection.execute("ECHO", "behind"))
    await asyncio.sleep(0)

    blocked.cancel()
    await asyncio.gather(blocked, return_exceptions=True)
    await raw.lpush(queue, "item")  # the server now answers the BLPOP, then the ECHO

    assert blocked.cancelled()
    assert await behind == "behind"
    assert await connection.execute("ECHO", "after") == "after"
    assert await raw.llen(queue) == 0  # cancelling did not unsend the BLPOP


@pytest.mark.redis_server
async def test_a_caller_cancelled_while_connecting_leaves_the_connection_to_the_others(
    connection: MultiplexedConnection,
) -> None:
    first = asyncio.create_task(connection.execute("ECHO", "first"))
    second = asyncio.create_task(connection.execute("ECHO", "second"))
    await asyncio.sleep(0)

    first.cancel()

    assert await second == "second"
    assert (await asyncio.gather(first, return_exceptions=True))[0].__class__ is asyncio.CancelledError
    assert await connection.execute("ECHO", "third") == "third"


async def test_a_connect_stopped_during_the_handshake_closes_its_socket() -> None:
    accepted: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append((reader, writer))  # reads the handshake, never answers it

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = MultiplexedConnection(lambda: Connection(host="127.0.0.1", port=port, protocol=2))
    try:
        call = asyncio.create_task(connection.execute("PING"))
        while not accepted:
            await asyncio.sleep(0.01)

        await connection.aclose()

        with pytest.raises(RedisConnectionError, match="closed by the client"):
            await call
        reader, _ = accepted[0]
        await asyncio.wait_for(reader.read(), timeout=30)  # EOF: the client closed its end
        assert reader.at_eof()
    finally:
        for _, writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.redis_server
async def test_a_reply_that_does_not_come_in_time_fails_the_call_and_the_next_call_reconnects(
    connections: Connections, redis_key_prefix: str
) -> None:
    connection = MultiplexedConnection(connections, reply_timeout=0.05)
    client_id = await connection.execute("CLIENT", "ID")

    with pytest.raises(RedisTimeoutError, match=r"no reply in 0\.05 s"):
        await connection.execute("BLPOP", f"{redis_key_prefix}empty", 0)

    assert await connection.execute("CLIENT", "ID") != client_id
    await connection.aclose()


@pytest.mark.redis_server
@pytest.mark.parametrize("connected", [True, False], ids=["connected", "connecting"])
async def test_a_closed_connection_fails_its_pending_calls_and_connects_again_on_use(
    connection: MultiplexedConnection, redis_key_prefix: str, connected: bool
) -> None:
    if connected:
        await connection.execute("PING")
    blocked = asyncio.create_task(connection.execute("BLPOP", f"{redis_key_prefix}empty", 0))
    await asyncio.sleep(0)

    await connection.aclose()

    with pytest.raises(RedisConnectionError, match="closed by the client"):
        await blocked
    assert await connection.execute("PING") == "PONG"


@pytest.mark.redis_server
def test_a_connection_closed_in_one_event_loop_works_in_the_next(connections: Connections) -> None:
    connection = MultiplexedConnection(connections)

    async def ping_and_close() -> Any:
        reply = await connection.execute("PING")
        await connection.aclose()
        return reply

    assert asyncio.run(ping_and_close()) == "PONG"
    assert asyncio.run(ping_and_close()) == "PONG"


@pytest.mark.redis_server
async def test_a_refused_connection_raises_redis_py_connect_error_and_a_later_call_connects(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory()
    server.stop()
    connection = MultiplexedConnection(Connections(server))

    with pytest.raises(RedisConnectionError, match="Error 111 connecting"):
        await connection.execute("PING")
    server.start()

    assert await connection.execute("PING") == "PONG"
    await connection.aclose()


@pytest.mark.redis_server
async def test_a_url_with_password_and_database_is_honoured_and_replies_stay_resp2(
    redis_server_factory: ServerFactory, redis_key_prefix: str
) -> None:
    server = redis_server_factory(password="hunter2")
    url = f"redis://:hunter2@127.0.0.1:{server.port}/3?protocol=3"
    commands = ConnectionCommands.from_url(url, connect_timeout=5, socket_timeout=5)
    key = f"{redis_key_prefix}h"

    await commands.connection.execute("HSET", key, "a", "1", "b", "2")

    assert await commands.hgetall(key) == {"a": "1", "b": "2"}  # a RESP3 map would differ
    check = aioredis.Redis.from_url(f"redis://:hunter2@127.0.0.1:{server.port}/3", decode_responses=True)
    assert await check.hget(key, "a") == "1"
    await check.aclose()
    await commands.aclose()


def test_a_url_that_is_not_redis_is_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="schemes"):
        ConnectionCommands.from_url("http://127.0.0.1:6379", connect_timeout=1, socket_timeout=1)


@pytest.fixture
def tls_port(tmp_path: Path) -> Iterator[int]:
    """A redis-server speaking only TLS (self-signed certificate) on a free loopback port."""
    executable, openssl = find_redis_server(), shutil.which("openssl")
    if executable is None or openssl is None:
        pytest.skip("the TLS test needs redis-server and openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    port = free_port()
    process = subprocess.Popen(
        [executable, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None:
                    pytest.skip("this redis-server was built without TLS")
                if time.monotonic() > deadline:
                    pytest.fail("the TLS redis-server did not start listening within 15 s")
                time.sleep(0.02)
        yield port
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.redis_server
async def test_a_tls_connection_is_handed_over_and_multiplexed_like_a_plain_one(tls_port: int) -> None:
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none"
    commands = ConnectionCommands.from_url(url, connect_timeout=5, socket_timeout=5)
    connection = commands.connection

    counts = await asyncio.gather(*(connection.execute("INCR", "n") for _ in range(20)))
    big = "x" * 300_000  # several TLS records each way
    await connection.execute("HSET", "h", "big", big)

    assert sorted(counts) == list(range(1, 21))
    assert await commands.hgetall("h") == {"big": big}
    await commands.aclose()
