"""Faults on a real redis-server: crashes and restarts mid-run, a server gone for good, bad settings."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from krules.errors import ConfigurationError, StorageUnavailableError
from krules.testing.redis_server import LocalRedisServer, free_port
from storage.base import SubjectChanges, Update
from storage.redis import create_redis_storage

pytestmark = [pytest.mark.redis_server, pytest.mark.slow]

ServerFactory = Callable[..., LocalRedisServer]

# Enough patience for a restart (a redis-server comes up in well under a second here).
PATIENT: dict[str, Any] = {"retries": 30, "retry_backoff": 0.01, "retry_backoff_cap": 0.2}
IMPATIENT: dict[str, Any] = {"retries": 2, "retry_backoff": 0.01, "retry_backoff_cap": 0.02}


def increment(n: Any) -> int:
    return (n or 0) + 1


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message
    assert message.endswith(".")
    assert re.search(r"\.\s+[A-Z]", message) is None, message


async def test_updates_ride_through_a_crash_and_restart_and_lose_no_increment(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory(persistent=True)
    storage = create_redis_storage(server.url, partitions=2, **PATIENT)
    halfway, crashed = asyncio.Event(), asyncio.Event()

    async def writer() -> None:
        for i in range(200):
            if i == 100:
                halfway.set()
                await crashed.wait()  # the next update meets a dead server
            await storage.update("counter", "n", increment)
            await storage.store([SubjectChanges("counter", {"i": str(i)}, {"last": str(i)})])

    task = asyncio.create_task(writer())
    await halfway.wait()
    server.stop(kill=True)
    crashed.set()
    await asyncio.to_thread(server.start)
    await task

    assert await storage.load("counter") == ({"n": 200, "i": 199}, {"last": 199})
    await storage.close()


async def test_a_batch_of_callable_updates_rides_through_a_restart(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory(persistent=True)
    storage = create_redis_storage(server.url, partitions=3, **PATIENT)
    names = [f"sensor-{i}" for i in range(10)]
    await storage.store([SubjectChanges(name, {"n": "0"}) for name in names])

    server.stop(kill=True)
    restart = asyncio.create_task(asyncio.to_thread(server.start))
    await storage.store([SubjectChanges(name, {"n": Update("0", increment, "1")}) for name in names])
    await restart

    assert [await storage.get(name, "n") for name in names] == [1] * 10
    await storage.close()


async def test_a_server_gone_for_good_is_one_sentence_naming_the_url_without_its_password(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory(password="hunter2")
    storage = create_redis_storage(server.url, **IMPATIENT)
    await storage.update("order-1", "n", increment)

    server.stop(kill=True)
    with pytest.raises(StorageUnavailableError) as caught:
        await storage.update("order-1", "n", increment)

    message = str(caught.value)
    assert message.startswith(
        f"Redis at redis://127.0.0.1:{server.port}/0 could not update subject 'order-1'"
    )
    assert "after 3 attempts" in message
    assert "hunter2" not in message
    assert_one_sentence(message)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    await storage.close()


async def test_every_operation_reports_an_unreachable_server_the_same_way() -> None:
    storage = create_redis_storage(f"redis://127.0.0.1:{free_port()}/0", **IMPATIENT)
    operations = [
        storage.check(),
        storage.load("s"),
        storage.get("s", "p"),
        storage.set("s", "p", "1"),
        storage.update("s", "p", increment),
        storage.delete("s", "p"),
        storage.flush("s"),
        storage.subjects(),
        storage.store([SubjectChanges("s", {"p": "1"})]),
    ]
    for operation in operations:
        with pytest.raises(StorageUnavailableError, match=r"could not reach|check that the server"):
            await operation
    await storage.close()


async def test_a_refused_connection_at_startup_is_one_clear_sentence() -> None:
    port = free_port()
    storage = create_redis_storage(f"redis://127.0.0.1:{port}/0", **IMPATIENT)

    with pytest.raises(StorageUnavailableError) as caught:
        await storage.check()

    message = str(caught.value)
    assert message.startswith(
        f"Redis at redis://127.0.0.1:{port}/0 could not ping and load scripts after 3 attempts"
    )
    assert "Error 111 connecting" in message
    assert_one_sentence(message)
    await storage.close()


@pytest.mark.parametrize("credentials", [":wrong-password@", "", "nobody:hunter2@"])
async def test_wrong_credentials_at_startup_are_one_sentence_without_the_password(
    redis_server_factory: ServerFactory, credentials: str
) -> None:
    server = redis_server_factory(password="hunter2")
    storage = create_redis_storage(f"redis://{credentials}127.0.0.1:{server.port}/0", **IMPATIENT)

    with pytest.raises(ConfigurationError, match="refused krules' credentials") as caught:
        await storage.check()

    message = str(caught.value)
    assert "wrong-password" not in message and "hunter2" not in message
    assert f"127.0.0.1:{server.port}" in message
    assert_one_sentence(message)
    await storage.close()


async def test_a_user_not_allowed_to_run_scripts_is_told_so_in_one_sentence(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory()
    admin = aioredis.Redis.from_url(server.url)
    await admin.acl_setuser(
        "reader", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-@scripting"]
    )
    await admin.aclose()
    storage = create_redis_storage(f"redis://reader:pw@127.0.0.1:{server.port}/0", **IMPATIENT)

    with pytest.raises(ConfigurationError, match="does not permit krules to ping and load scripts") as caught:
        await storage.check()

    assert_one_sentence(str(caught.value))
    await storage.close()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "redis://127.0.0.1:notaport/0", "redis://:pw@host:99999"]
)
def test_a_malformed_url_is_a_configuration_error_at_creation(url: str) -> None:
    with pytest.raises(ConfigurationError, match="is not valid") as caught:
        create_redis_storage(url)

    assert "pw@" not in str(caught.value)
    assert_one_sentence(str(caught.value))
