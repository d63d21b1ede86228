"""A primary Sentinel manages: redis+sentinel:// URLs, and a failover under a running instance."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from krules.errors import ConfigurationError
from krules.testing import wait_until
from krules.testing.redis_sentinel import LocalRedisSentinel
from storage.redis import create_redis_storage
from storage.redis.sentinel import parse_sentinel_url
from tests.failover_counting import counted, counting_app, send_round


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_primarys_options() -> None:
    sentinels, service, options = parse_sentinel_url("redis+sentinel://:pw@10.0.0.1:26380,10.0.0.2/main?db=3")

    assert (sentinels, service) == ([("10.0.0.1", 26380), ("10.0.0.2", 26379)], "main")
    assert (options["password"], options["db"]) == ("pw", 3)


def test_a_sentinel_url_without_a_service_is_refused_in_one_sentence() -> None:
    with pytest.raises(ConfigurationError, match="service name the sentinels monitor"):
        create_redis_storage("redis+sentinel://127.0.0.1:26379/")


@pytest.mark.redis_server
@pytest.mark.slow
async def test_a_killed_primary_is_replaced_by_its_replica_and_every_event_counts_once(
    redis_sentinel_factory: Callable[..., LocalRedisSentinel], redis_key_prefix: str
) -> None:
    setup = redis_sentinel_factory()
    app = counting_app(setup.url, redis_key_prefix, partitions=2)
    await app.start()
    await send_round(app)
    await wait_until(lambda: counted(app, 1), timeout=30)
    victim = setup.primary

    async def replaced() -> bool:
        return await asyncio.to_thread(lambda: setup.primary is not victim)

    await send_round(app)  # each append acknowledged by the replica
    victim.stop(kill=True)  # while those are being processed and committed
    await wait_until(replaced, timeout=60)
    victim.start()  # back, empty, and made the new primary's replica by the sentinels
    await asyncio.to_thread(setup.wait_until_watched, 60.0)

    await send_round(app)
    await wait_until(lambda: counted(app, 3), timeout=90)
    await app.stop()
    assert setup.primary is not victim
