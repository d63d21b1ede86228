"""KRules' Redis setup, ``create_redis_storage(redis_client=create_redis_client(url), redis_prefix=...)``,
gives a storage that shares its data with the one a krules instance makes from a URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from dependency_injector import providers

from krules import KRulesContainer
from krules.errors import ConfigurationError
from krules.testing.redis_server import LocalRedisServer
from storage.base import SubjectChanges
from storage.redis import RedisStorage, create_redis_client, create_redis_storage


def increment(n: Any) -> int:
    return (n or 0) + 1


@pytest.fixture
async def instance_storage(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> AsyncIterator[RedisStorage]:
    """The storage a krules instance makes from its settings (URL and key prefix)."""
    storage = create_redis_storage(url=redis_server.url, key_prefix=redis_key_prefix)
    yield storage
    await storage.close()


@pytest.fixture
async def ported_storage(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> AsyncIterator[RedisStorage]:
    """The storage a KRules rule module sets up, with only its imports changed."""
    client = create_redis_client(redis_server.url)
    storage = create_redis_storage(redis_client=client, redis_prefix=redis_key_prefix)
    yield storage
    await storage.close()
    await client.aclose()


@pytest.mark.redis_server
async def test_the_krules_setup_reads_what_a_krules_instance_wrote(
    instance_storage: RedisStorage, ported_storage: RedisStorage
) -> None:
    changes = SubjectChanges("user-1", {"name": '"Ada"', "age": "36"}, {"tier": '"gold"'})
    await instance_storage.store([changes])
    await instance_storage.update("user-1", "visits", increment)

    assert await ported_storage.load("user-1") == ({"name": "Ada", "age": 36, "visits": 1}, {"tier": "gold"})
    assert await ported_storage.get("user-1", "tier", ext=True) == "gold"


@pytest.mark.redis_server
async def test_a_krules_instance_reads_what_the_krules_setup_wrote(
    instance_storage: RedisStorage, ported_storage: RedisStorage
) -> None:
    await ported_storage.store([SubjectChanges("user-2", {"name": '"Grace"'}, {"tier": '"basic"'})])
    await ported_storage.set("user-2", "email", '"grace@example.com"')
    await ported_storage.update("user-2", "visits", increment)
    await instance_storage.update("user-2", "visits", increment)  # both count on one value

    assert await instance_storage.load("user-2") == (
        {"name": "Grace", "email": "grace@example.com", "visits": 2},
        {"tier": "basic"},
    )


@pytest.mark.redis_server
async def test_an_awaited_create_redis_client_works_in_the_krules_setup_too(
    redis_server: LocalRedisServer, redis_key_prefix: str, instance_storage: RedisStorage
) -> None:
    client = await create_redis_client(redis_server.url)  # KRules' create_redis_client is awaited
    try:
        storage = create_redis_storage(redis_client=client, redis_prefix=redis_key_prefix)
        await storage.set("user-3", "name", '"Linus"')
        assert await instance_storage.get("user-3", "name") == "Linus"
    finally:
        await client.aclose()


@pytest.mark.redis_server
async def test_a_container_set_up_as_in_krules_stores_subjects_a_krules_instance_reads(
    ported_storage: RedisStorage, instance_storage: RedisStorage
) -> None:
    container = KRulesContainer()
    container.subject_storage.override(providers.Object(ported_storage))
    user = container.subject("user-4")
    await user.set("name", "Barbara")
    await user.set_ext("tenant", "acme")
    await user.store()

    assert await instance_storage.load("user-4") == ({"name": "Barbara"}, {"tenant": "acme"})


def test_a_client_passed_both_as_client_and_redis_client_is_refused() -> None:
    client = create_redis_client("redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigurationError, match=r"client=\.\.\. or redis_client=\.\.\., not both"):
        create_redis_storage(client=client, redis_client=client)


def test_a_bad_url_given_to_create_redis_client_is_one_sentence_naming_it() -> None:
    with pytest.raises(ConfigurationError, match=r"The Redis URL 'http://example\.com' is not valid"):
        create_redis_client("http://example.com")
