"""Generated hostile input against a Redis-mode instance on a real redis-server: a few thousand malformed
events, each built to be invalid (a lone surrogate, bytes that are not UTF-8, JSON cut short or nested
too deep, NaN, data that is not an object, a required attribute missing or of the wrong kind...), sent
to the HTTP ingress (structured, batch and binary mode) and written straight into the partition stream,
with good events interleaved.

Every hostile request is answered 4xx and queues nothing, every hostile entry becomes an
``invalid_event`` dead letter and leaves nothing pending, the instance keeps running throughout, and
every good event is processed exactly once.  Hypothesis generates the cases (deterministically, bounded
by ``max_examples``); the instance then gets them all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from krules.context import EventContext
from krules.dead_letters import DeadLetters
from krules.decoding import MAX_NESTING
from krules.http.server import serve_in_background
from krules.testing import RedisModeApp, wait_until
from krules.testing.redis_server import LocalRedisServer
from storage.redis.keys import CONSUMER_GROUP

pytestmark = pytest.mark.redis_server

GROUPS = 40  # each: GROUP hostile requests, GROUP hostile entries, then a good event each way
GROUP = 25

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
REQUIRED = ("specversion", "id", "source", "type", "subject")

# -- the cases -----------------------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = (
    json_scalars
    | st.lists(json_scalars, max_size=3)
    | st.dictionaries(st.text(max_size=6), json_scalars, max_size=3)
)
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


@st.composite
def with_surrogate(draw: st.DrawFn) -> str:
    text = draw(st.text(max_size=12))
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(surrogates) + text[at:]


@st.composite
def base_event(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": draw(st.text(min_size=1, max_size=10)),
        "source": draw(st.sampled_from(["s", "other-service", "https://example.com/x"])),
        "type": draw(st.sampled_from(["count.inc", "order.placed", "x"])),
        "subject": draw(st.text(min_size=1, max_size=10)),
        "data": draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
    }


def nest(levels: int, leaf: Any) -> Any:
    value = leaf
    for level in range(levels):
        value = [value] if level % 2 else {"n": value}
    return value


@st.composite
def hostile_data(draw: st.DrawFn) -> bytes:
    """A data payload (binary mode's body) that krules must refuse, whatever the rest of the event."""
    kind = draw(st.sampled_from(["deep", "surrogate", "surrogate key", "nan", "not an object", "raw"]))
    if kind == "deep":
        return json.dumps({"d": nest(draw(st.integers(MAX_NESTING, 400)), draw(json_scalars))}).encode()
    if kind == "surrogate":
        return json.dumps({"k": draw(with_surrogate())}).encode()  # escaped: ASCII bytes
    if kind == "surrogate key":
        return json.dumps({draw(with_surrogate()): draw(json_scalars)}).encode()
    if kind == "nan":
        constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        return b'{"x": [1, ' + constant.encode() + b"]}"
    if kind == "not an object":
        value = draw(
            st.lists(json_values, max_size=3) | st.integers() | st.booleans() | st.floats(allow_nan=False)
        )
        return json.dumps(value).encode()
    return draw(raw_damage(json.dumps(draw(base_event())["data"]).encode()))


@st.composite
def raw_damage(draw: st.DrawFn, text: bytes) -> bytes:
    """``text`` (ASCII JSON) made invalid: a byte that cannot be UTF-8 there, or cut short."""
    if draw(st.booleans()) or len(text) < 2:
        at = draw(st.integers(0, len(text)))
        return text[:at] + bytes([draw(st.integers(0x80, 0xFF))]) + text[at:]  # ASCII + one high byte
    return text[: draw(st.integers(1, len(text) - 1))]


@st.composite
def hostile_event(draw: st.DrawFn) -> bytes:
    """One event's JSON that krules must refuse."""
    event = draw(base_event())
    kind = draw(
        st.sampled_from(
            ["missing", "wrong kind", "surrogate attribute", "surrogate extension", "bad time", "data", "raw"]
        )
    )
    if kind == "missing":
        del event[draw(st.sampled_from(REQUIRED))]
    elif kind == "wrong kind":
        name = draw(st.sampled_from(REQUIRED))
        event[name] = draw(
            st.sampled_from(["", None, 1, 1.5, True, [], {}]) | st.lists(st.text(), min_size=1)
        )
        if name == "specversion":
            event[name] = draw(st.sampled_from(["0.3", "2.0", "", 1]))
    elif kind == "surrogate attribute":
        event[draw(st.sampled_from(["id", "source", "type", "subject"]))] = draw(with_surrogate())
    elif kind == "surrogate extension":
        event["tenant"] = draw(with_surrogate())
    elif kind == "bad time":
        event["time"] = draw(st.sampled_from(["yesterday", "2026-01-31T12:00:00", "", 42, "T"]))
    elif kind == "data":
        data = draw(hostile_data())
        text = json.dumps({**event, "data": "DATA"}).encode()
        return text.replace(b'"DATA"', data)
    else:
        return draw(raw_damage(json.dumps(event).encode()))
    return json.dumps(event).encode()


@dataclass
class Request:
    body: bytes
    headers: dict[str, str]


@st.composite
def hostile_request(draw: st.DrawFn) -> Request:
    mode = draw(st.sampled_from(["structured", "batch", "binary", "junk"]))
    if mode == "structured":
        return Request(draw(hostile_event()), {"content-type": STRUCTURED})
    if mode == "batch":  # one hostile event spoils the batch: its good events are not processed either
        good = json.dumps({**draw(base_event()), "type": "count.inc", "subject": "batch-victim"}).encode()
        return Request(b"[" + good + b"," + draw(hostile_event()) + b"]", {"content-type": BATCH})
    if mode == "binary":
        headers = {
            f"ce-{name}": value for name, value in (("specversion", "1.0"), ("id", "b"), ("source", "s"))
        }
        headers |= {"ce-type": "count.inc", "ce-subject": "binary-victim", "content-type": "application/json"}
        return Request(draw(hostile_data()), headers)
    junk = draw(st.binary(min_size=1, max_size=64).filter(lambda b: b.strip() not in (b"", b"null")))
    return Request(junk, {"content-type": draw(st.sampled_from([STRUCTURED, BATCH]))})


@st.composite
def hostile_entry(draw: st.DrawFn) -> dict[str, bytes]:
    if draw(st.integers(0, 9)) == 0:  # no 'event' field at all
        return {draw(st.sampled_from(["evt", "payload", "Event"])): draw(hostile_event())}
    return {"event": draw(hostile_event())}


def generate(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """``count`` examples of ``strategy``, the same on every run (Hypothesis as a generator)."""
    cases: list[Any] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(case: Any) -> None:
        cases.append(case)

    collect()
    return cases


# -- the instance ---------------------------------------------------------------------------------------
class Instance(RedisModeApp):
    def __init__(self, url: str, key_prefix: str) -> None:
        super().__init__(url, key_prefix, partitions=1, stream_batch=200)
        self.handled: list[str] = []

        @self.on("count.inc")
        async def count(ctx: EventContext) -> None:
            self.handled.append(ctx.subject.name)
            await ctx.subject.set("count", lambda n: (n or 0) + 1)


@pytest.fixture
async def instance(redis_server: LocalRedisServer, redis_key_prefix: str) -> AsyncIterator[Instance]:
    app = Instance(redis_server.url, redis_key_prefix)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture
async def raw(redis_server: LocalRedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def good_event(n: int) -> bytes:
    event = {
        "specversion": "1.0",
        "id": f"good-{n}",
        "source": "fuzz",
        "type": "count.inc",
        "subject": f"good-{n}",
    }
    return json.dumps(event).encode()


async def test_thousands_of_hostile_events_are_refused_or_dead_lettered_and_good_ones_counted_once(
    instance: Instance, raw: aioredis.Redis
) -> None:
    groups = generate(
        st.tuples(
            st.lists(hostile_request(), min_size=GROUP, max_size=GROUP),
            st.lists(hostile_entry(), min_size=GROUP, max_size=GROUP),
        ),
        GROUPS,
    )
    stream = instance.storage.keys.stream(0)
    good = 0
    answers: list[tuple[Request, httpx.Response]] = []

    async with serve_in_background(instance.engine) as server, httpx.AsyncClient(timeout=30) as http:
        url = server.url + "/events"

        async def post(request: Request) -> tuple[Request, httpx.Response]:
            return request, await http.post(url, content=request.body, headers=request.headers)

        for requests, entries in groups:
            answers += await asyncio.gather(*map(post, requests))
            async with raw.pipeline(transaction=False) as pipe:
                for entry in entries:
                    pipe.xadd(stream, entry)
                await pipe.execute()
            # One good event by HTTP, the next straight into the stream.
            response = await http.post(url, content=good_event(good), headers={"content-type": STRUCTURED})
            assert response.status_code == 202, response.text
            await raw.xadd(stream, {"event": good_event(good + 1)})
            good += 2

        async def settled() -> bool:
            props, _ = await instance.storage.load("dlq-index")
            return len(props) == GROUPS * GROUP and len(instance.handled) >= good

        await wait_until(settled, timeout=60)
        assert (await raw.xpending(stream, CONSUMER_GROUP))["pending"] == 0
        after = await http.post(url, content=good_event(good), headers={"content-type": STRUCTURED})
        good += 1
        await wait_until(lambda: _handled(instance, good))
        letters = await DeadLetters(instance.storage).list()
        await instance.stop()  # the worker before the engine, as krules run does; raises if it crashed

    wrong = [
        (r.body[:120], a.status_code, a.text[:200]) for r, a in answers if not 400 <= a.status_code < 500
    ]
    assert wrong == [], f"{len(wrong)} hostile request(s) not refused, e.g. {wrong[:3]}"
    for request, answer in answers:
        reason = answer.json()["error"]
        assert reason[:1].isupper() and reason.endswith(".") and "\n" not in reason, (
            request.body[:120],
            reason,
        )
    assert after.status_code == 202  # the instance serves on
    # Each good event exactly once, and nothing else: not the good events of a refused batch
    # ("batch-victim"), nor a refused binary-mode event ("binary-victim").
    assert sorted(instance.handled) == sorted(f"good-{n}" for n in range(good))
    assert [letter.reason for letter in letters] == ["invalid_event"] * (GROUPS * GROUP)


async def _handled(instance: Instance, count: int) -> bool:
    return len(instance.handled) >= count
