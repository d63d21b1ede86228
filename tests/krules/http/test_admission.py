"""Admission at the ingress, over a real loopback socket: past a bound on what waits, a request is
refused with 503 and Retry-After before anything of it is accepted, and what was accepted is done."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from krules.config import Settings
from krules.context import EventContext
from krules.http.server import KRulesServer, serve_in_background
from krules.http.stats import ServerCollector, ServerStats
from krules.partitioning import partition_of
from krules.testing import KRulesTestApp, RedisModeApp, wait_until
from krules.testing.redis_server import LocalRedisServer

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


def cloudevent(subject: str, event_id: str, event_type: str = "job.run", **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "tests",
        "type": event_type,
        "subject": subject,
        "data": data,
    }


def assert_refused(response: httpx.Response, bound: str) -> None:
    """A 503 naming ``bound`` in one sentence, with a Retry-After in whole seconds."""
    assert response.status_code == 503, response.text
    assert re.fullmatch(r"[1-9][0-9]*", response.headers["retry-after"])
    error = response.json()["error"]
    assert bound in error and error.endswith(".") and "\n" not in error


class Blocked:
    """A krules app whose ``job.run`` handler waits for :meth:`release` (so turns pile up), served."""

    def __init__(self, app: KRulesTestApp) -> None:
        self.app = app
        self.released = asyncio.Event()
        self.started = 0

        @app.on("job.run")
        async def run(ctx: EventContext) -> None:
            self.started += 1
            await self.released.wait()
            await ctx.subject.set("runs", lambda n: (n or 0) + 1)

    def release(self) -> None:
        self.released.set()


@pytest.fixture
async def blocked() -> AsyncIterator[tuple[Blocked, KRulesServer, httpx.AsyncClient]]:
    app = KRulesTestApp(settings=Settings(max_queued_turns=3, ingress_max_queued_bytes=4096))
    job = Blocked(app)
    async with serve_in_background(app.engine) as server, httpx.AsyncClient(timeout=30) as http:
        yield job, server, http
        job.release()


async def post(
    http: httpx.AsyncClient, url: str, body: Any, content_type: str = STRUCTURED
) -> httpx.Response:
    return await http.post(url + "/events", content=json.dumps(body), headers={"content-type": content_type})


async def test_past_the_queued_turns_bound_requests_are_503_with_retry_after_and_the_rest_all_run(
    blocked: tuple[Blocked, KRulesServer, httpx.AsyncClient],
) -> None:
    job, server, http = blocked
    engine = job.app.engine
    sent = [
        asyncio.ensure_future(post(http, server.url, cloudevent("job-1", f"ev-{i}")))
        for i in range(40)  # one subject: one turn runs, the others wait for its lane
    ]

    async def all_settled_in() -> bool:  # each request is either refused or waiting in the queue
        return sum(task.done() for task in sent) + engine.queued == 39 and job.started == 1

    await wait_until(all_settled_in, timeout=30)
    waiting = engine.queued
    assert 1 <= waiting <= 3  # the bound, however many came (a request let in counts until it runs)
    refused = [task.result() for task in sent if task.done()]
    for response in refused:
        assert_refused(response, "KRULES_MAX_QUEUED_TURNS=3")
    assert server.stats.refused["queued_turns"] == len(refused) == 39 - waiting

    job.release()
    answers = await asyncio.gather(*sent)
    accepted = 1 + waiting
    assert sorted(r.status_code for r in answers) == [200] * accepted + [503] * (40 - accepted)
    assert await job.app.stored("job-1") == {"runs": accepted}  # every accepted event ran
    assert server.stats.queued_bytes == 0


async def test_a_batch_that_would_pass_the_queued_turns_bound_is_refused_whole(
    blocked: tuple[Blocked, KRulesServer, httpx.AsyncClient],
) -> None:
    job, server, http = blocked
    engine = job.app.engine
    first = asyncio.ensure_future(post(http, server.url, cloudevent("job-1", "first")))
    second = asyncio.ensure_future(post(http, server.url, cloudevent("job-1", "second")))

    async def one_waiting() -> bool:
        return engine.queued == 1

    await wait_until(one_waiting, timeout=30)
    batch = [cloudevent(f"job-{i}", f"batch-{i}") for i in range(2, 5)]  # 1 waiting + 3 > 3

    response = await post(http, server.url, batch, BATCH)

    assert_refused(response, "KRULES_MAX_QUEUED_TURNS=3")
    job.release()
    assert [(await first).status_code, (await second).status_code] == [200, 200]
    for i in range(2, 5):
        assert await job.app.stored(f"job-{i}") == {}  # nothing of the refused batch ran
    assert (await post(http, server.url, batch, BATCH)).status_code == 200  # room again


async def test_past_the_queued_bytes_bound_a_request_is_503_until_the_held_one_is_answered(
    blocked: tuple[Blocked, KRulesServer, httpx.AsyncClient],
) -> None:
    job, server, http = blocked
    big = asyncio.ensure_future(post(http, server.url, cloudevent("job-1", "big", pad="x" * 3000)))

    async def held() -> bool:
        return job.started == 1

    await wait_until(held, timeout=30)
    assert server.stats.queued_bytes > 3000

    refused = await post(http, server.url, cloudevent("job-2", "small", pad="y" * 1200))

    assert_refused(refused, "KRULES_INGRESS_MAX_QUEUED_BYTES=4096")
    assert server.stats.refused["queued_bytes"] == 1
    job.release()
    assert (await big).status_code == 200
    assert server.stats.queued_bytes == 0
    assert (await post(http, server.url, cloudevent("job-2", "small", pad="y" * 1200))).status_code == 200


async def test_one_request_is_let_in_whatever_its_size_when_nothing_waits() -> None:
    app = KRulesTestApp(settings=Settings(max_queued_turns=1, ingress_max_queued_bytes=1024))

    @app.on("job.run")
    async def run(ctx: EventContext) -> None:
        await ctx.subject.set("done", True)

    batch = [cloudevent(f"job-{i}", f"ev-{i}", pad="z" * 100) for i in range(5)]
    async with serve_in_background(app.engine) as server, httpx.AsyncClient(timeout=30) as http:
        response = await post(http, server.url, batch, BATCH)

    assert response.status_code == 200
    assert response.json()["accepted"] == 5


def test_the_collector_exports_refusals_timeouts_connections_and_queued_turns() -> None:
    app = KRulesTestApp()
    stats = ServerStats()
    registry = CollectorRegistry()
    registry.register(ServerCollector(stats, app.engine))
    stats.refused["stream_backlog"] += 2
    stats.timeouts["header"] += 3
    stats.connections = 7
    stats.connections_refused = 11
    stats.queued_bytes = 512
    stats.accept_errors = 5

    sample = registry.get_sample_value
    assert sample("krules_ingress_refused_total", {"reason": "stream_backlog"}) == 2
    assert sample("krules_ingress_refused_total", {"reason": "queued_turns"}) == 0
    assert sample("krules_http_timeouts_total", {"kind": "header"}) == 3
    assert sample("krules_http_connections") == 7
    assert sample("krules_http_connections_refused_total") == 11
    assert sample("krules_ingress_queued_bytes") == 512
    assert sample("krules_http_accept_errors_total") == 5
    assert sample("krules_turns_queued") == 0


# -- Redis mode ----------------------------------------------------------------------------------
def subjects_of_partition(partition: int, partitions: int, count: int) -> list[str]:
    found = [f"s-{i}" for i in range(10_000) if partition_of(f"s-{i}", partitions) == partition]
    return found[:count]


@pytest.mark.redis_server
async def test_redis_mode_refuses_events_for_a_partition_whose_stream_backlog_is_at_its_bound(
    redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    instance = RedisModeApp(redis_server.url, redis_key_prefix, partitions=2, max_stream_backlog=50)

    @instance.on("job.run")
    async def run(ctx: EventContext) -> None:
        await ctx.subject.set("runs", lambda n: (n or 0) + 1)

    full = subjects_of_partition(0, 2, 60)
    other = subjects_of_partition(1, 2, 1)[0]
    # The worker is not started yet: nothing is processed, so partition 0's stream fills up.
    async with serve_in_background(instance.engine) as server, httpx.AsyncClient(timeout=30) as http:
        try:
            filling = [cloudevent(s, f"fill-{s}") for s in full]
            assert (await post(http, server.url, filling, BATCH)).status_code == 202

            refused = await post(http, server.url, cloudevent(full[0], "late"))
            elsewhere = await post(http, server.url, cloudevent(other, "elsewhere"))

            assert_refused(refused, "KRULES_MAX_STREAM_BACKLOG=50")
            assert elsewhere.status_code == 202  # another partition's stream is not full
            assert server.stats.refused["stream_backlog"] == 1

            await instance.start()  # the owner works the backlog down: the partition takes events again
            retried: list[int] = []

            async def let_in_again() -> bool:
                retried.append((await post(http, server.url, cloudevent(full[0], "late"))).status_code)
                return retried[-1] == 202

            await wait_until(let_in_again, timeout=60)
            assert set(retried) <= {202, 503}

            async def all_processed() -> bool:
                stored = [await instance.storage.load(s) for s in [*full, other]]
                return all(props.get("runs") for props, _ in stored)

            await wait_until(all_processed, timeout=60)
            assert (await instance.storage.load(full[0]))[0] == {"runs": 2}  # fill-, then late
        finally:
            await instance.stop()  # the worker before the server closes the engine
