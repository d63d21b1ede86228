"""The storage's commands on a real redis-server: stream reads give a value that is not UTF-8 as bytes,
on the storage's own connection and on a client passed in that decodes its replies."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from krules.testing.redis_server import LocalRedisServer
from storage.redis._resp_connection import undecoded
from storage.redis.commands import ClientCommands, ConnectionCommands, RedisCommands

pytestmark = pytest.mark.redis_server


@pytest.fixture(params=["connection", "decoding client"])
async def commands(
    request: pytest.FixtureRequest, redis_server: LocalRedisServer
) -> AsyncIterator[RedisCommands]:
    if request.param == "connection":
        made: RedisCommands = ConnectionCommands.from_url(
            redis_server.url, connect_timeout=5, socket_timeout=5
        )
        yield made
        await made.aclose()
    else:
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        yield ClientCommands(client)
        await client.aclose()


def values(reply: object) -> list[object]:
    """The field values of the first entry in a list of ``[id, fields]`` entries (flat list or dict)."""
    fields = reply[0][1]  # type: ignore[index]
    return list(fields.values()) if isinstance(fields, dict) else list(fields[1::2])


async def test_stream_reads_give_a_value_that_is_not_utf8_back_as_its_bytes(
    commands: RedisCommands, redis_key_prefix: str
) -> None:
    stream = f"{redis_key_prefix}stream"
    await commands.execute("XADD", stream, "*", "event", b"\xff\xfe", "note", "caf\xe9")
    await commands.execute("XGROUP", "CREATE", stream, "g", "0")

    (read,) = await commands.execute("XREADGROUP", "GROUP", "g", "a", "COUNT", 1, "STREAMS", stream, ">")
    (claimed,) = await commands.execute_many([("XAUTOCLAIM", stream, "g", "b", 0, "0-0", "COUNT", 1)])

    for reply in (read[1], claimed[1]):
        first, second = values(reply)
        # never replaced, never an error: bytes, or the C parser's escapes of them
        assert (undecoded(first) if isinstance(first, str) else first) == b"\xff\xfe"
        assert second in ("caf\xe9", "caf\xe9".encode())
