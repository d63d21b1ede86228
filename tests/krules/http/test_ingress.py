"""The HTTP ingress, over a real loopback socket: modes, validation, limits, auth and storage failures."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from krules.config import Settings
from krules.context import EventContext
from krules.errors import ServerError, StorageUnavailableError
from krules.http.server import KRulesServer, ServerThread, bind_socket, serve_in_background
from krules.testing import KRulesTestApp
from storage.base import SubjectChanges
from storage.memory import MemoryStorage

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


def cloudevent(
    subject: str | None = "order-1", event_type: str = "order.placed", **fields: Any
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"{subject}-{event_type}",
        "source": "tests",
        "type": event_type,
        "subject": subject,
        "datacontenttype": "application/json",
        "data": {"total": 30},
    }
    event.update(fields)
    return {k: v for k, v in event.items() if v is not None}


def binary_headers(**overrides: str | None) -> dict[str, str]:
    headers: dict[str, str | None] = {
        "ce-specversion": "1.0",
        "ce-id": "bin-1",
        "ce-source": "tests",
        "ce-type": "order.placed",
        "ce-subject": "order-1",
        "content-type": "application/json",
    }
    headers.update(overrides)
    return {k: v for k, v in headers.items() if v is not None}


def assert_one_sentence(text: str) -> None:
    assert text[:1].isupper(), text
    assert text.endswith("."), text
    assert "\n" not in text, text
    assert not re.search(r"\.\s+[A-Z]", text), f"more than one sentence: {text!r}"


class Instance:
    """A served test app and an HTTP client pointed at it."""

    def __init__(self, app: KRulesTestApp, url: str, http: httpx.AsyncClient) -> None:
        self.app = app
        self.url = url
        self.http = http

    async def post(
        self, content: bytes | str, headers: dict[str, str], path: str = "/events"
    ) -> httpx.Response:
        return await self.http.post(self.url + path, content=content, headers=headers)

    async def post_json(self, body: Any, content_type: str = STRUCTURED, **headers: str) -> httpx.Response:
        return await self.post(json.dumps(body), {"content-type": content_type, **headers})

    async def stored_subjects(self) -> list[str]:
        return await self.app.storage.subjects()


def add_order_rules(app: KRulesTestApp) -> None:
    @app.on("order.placed")
    async def record_total(ctx: EventContext) -> None:
        await ctx.subject.set("total", ctx.payload.get("total"))
        await ctx.subject.set_ext("seen_by", "ingress-test")

    @app.on("order.placed")
    async def append_sequence(ctx: EventContext) -> None:
        if "n" in ctx.payload:
            n = ctx.payload["n"]
            await ctx.subject.set("sequence", lambda seq: [*(seq or []), n])

    @app.on("order.broken")
    async def broken(ctx: EventContext) -> None:
        raise RuntimeError("this rule is broken")


@asynccontextmanager
async def serve(app: KRulesTestApp) -> AsyncIterator[Instance]:
    add_order_rules(app)
    async with serve_in_background(app.engine) as server, httpx.AsyncClient(timeout=10) as http:
        yield Instance(app, server.url, http)


@pytest.fixture
async def instance(krules_app: KRulesTestApp) -> AsyncIterator[Instance]:
    async with serve(krules_app) as served:
        yield served


def app_with(settings: Settings | None = None, storage: MemoryStorage | None = None) -> KRulesTestApp:
    return KRulesTestApp(storage=storage, settings=settings)


# -- accepted events -------------------------------------------------------------------------------
async def test_a_binary_mode_event_is_processed_before_the_answer(instance: Instance) -> None:
    response = await instance.post(b'{"total": 42}', binary_headers())

    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "ids": ["bin-1"]}
    assert await instance.app.stored("order-1") == {"total": 42}


async def test_a_structured_mode_event_is_processed_on_the_root_path_too(instance: Instance) -> None:
    response = await instance.post(
        json.dumps(cloudevent(data={"total": 7})), {"content-type": STRUCTURED}, "/"
    )

    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "ids": ["order-1-order.placed"]}
    assert await instance.app.stored("order-1") == {"total": 7}


async def test_a_batch_is_processed_whole_keeping_each_subjects_order(instance: Instance) -> None:
    batch = [
        cloudevent("order-1", id="a1", data={"n": 1, "total": 1}),
        cloudevent("order-2", id="b1", data={"n": 1, "total": 2}),
        cloudevent("order-1", id="a2", data={"n": 2, "total": 1}),
        cloudevent("order-1", id="a3", data={"n": 3, "total": 1}),
    ]
    response = await instance.post_json(batch, BATCH)

    assert response.status_code == 200
    assert response.json() == {"accepted": 4, "ids": ["a1", "b1", "a2", "a3"]}
    assert (await instance.app.stored("order-1"))["sequence"] == [1, 2, 3]
    assert (await instance.app.stored("order-2"))["sequence"] == [1]


async def test_a_batchs_events_for_different_subjects_run_concurrently(krules_app: KRulesTestApp) -> None:
    arrived: dict[str, asyncio.Event] = {"left": asyncio.Event(), "right": asyncio.Event()}

    @krules_app.on("meet")
    async def wait_for_the_other_side(ctx: EventContext) -> None:
        arrived[ctx.subject.name].set()
        other = "right" if ctx.subject.name == "left" else "left"
        await asyncio.wait_for(arrived[other].wait(), 5)  # a deadlock guard, not a timing assertion
        await ctx.subject.set("met", True)

    async with serve(krules_app) as served:
        batch = [cloudevent("left", "meet", id="l"), cloudevent("right", "meet", id="r")]
        response = await served.post_json(batch, BATCH)

        assert response.status_code == 200
        assert krules_app.recorder.failures == []
        assert await krules_app.stored("left") == {"met": True}
        assert await krules_app.stored("right") == {"met": True}


async def test_a_failing_handler_does_not_make_the_request_fail(instance: Instance) -> None:
    response = await instance.post_json(cloudevent(event_type="order.broken", id="x-1"))

    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "ids": ["x-1"]}
    [failure] = instance.app.recorder.failures
    assert str(failure.error) == "this rule is broken"


async def test_extension_attributes_reach_the_event(instance: Instance) -> None:
    response = await instance.post(b"{}", binary_headers(**{"ce-tenant": "acme"}))

    assert response.status_code == 200
    assert instance.app.recorder.events[0].extensions == {"tenant": "acme"}


# -- malformed requests ---------------------------------------------------------------------------
MALFORMED: Sequence[tuple[str, bytes, dict[str, str]]] = [
    ("structured body is not JSON", b'{"type": ', {"content-type": STRUCTURED}),
    ("structured body is not UTF-8", b"\xff\xfe{}", {"content-type": STRUCTURED}),
    ("missing type", json.dumps(cloudevent(type=None)).encode(), {"content-type": STRUCTURED}),
    ("missing id", json.dumps(cloudevent(id=None)).encode(), {"content-type": STRUCTURED}),
    ("missing source", json.dumps(cloudevent(source=None)).encode(), {"content-type": STRUCTURED}),
    ("missing subject", json.dumps(cloudevent(subject=None)).encode(), {"content-type": STRUCTURED}),
    ("missing specversion", json.dumps(cloudevent(specversion=None)).encode(), {"content-type": STRUCTURED}),
    ("old specversion", json.dumps(cloudevent(specversion="0.3")).encode(), {"content-type": STRUCTURED}),
    ("data is a list", json.dumps(cloudevent(data=[1, 2])).encode(), {"content-type": STRUCTURED}),
    ("bad time", json.dumps(cloudevent(time="yesterday")).encode(), {"content-type": STRUCTURED}),
    ("structured body is an array", json.dumps([cloudevent()]).encode(), {"content-type": STRUCTURED}),
    ("empty batch", b"[]", {"content-type": BATCH}),
    ("batch is an object", json.dumps(cloudevent()).encode(), {"content-type": BATCH}),
    (
        "one bad event spoils the batch",
        json.dumps([cloudevent("order-1"), cloudevent("order-2", id=None)]).encode(),
        {"content-type": BATCH},
    ),
    ("binary without ce-id", b'{"total": 1}', binary_headers(**{"ce-id": None})),
    ("binary without ce-subject", b'{"total": 1}', binary_headers(**{"ce-subject": None})),
    ("binary data is not JSON", b"not json", binary_headers()),
    ("binary data is text", b"hello", binary_headers(**{"content-type": "text/plain"})),
    ("binary data is a number", b"42", binary_headers()),
    ("binary bad time", b"{}", binary_headers(**{"ce-time": "soon"})),
    ("not a CloudEvent at all", b'{"total": 1}', {"content-type": "application/json"}),
    ("no content type", b"", {}),
]


@pytest.fixture(scope="module")
def refusing_instance() -> Iterator[tuple[KRulesTestApp, str]]:
    """One instance (on its own thread) for the many requests that must all be refused."""
    app = app_with(Settings(ingress_token="s3cret-token"))
    add_order_rules(app)
    with ServerThread(app.engine) as server:
        yield app, server.url


@pytest.mark.parametrize(("case", "body", "headers"), MALFORMED, ids=[case for case, _, _ in MALFORMED])
async def test_a_malformed_request_is_400_with_a_sentence_and_nothing_is_processed(
    refusing_instance: tuple[KRulesTestApp, str], case: str, body: bytes, headers: dict[str, str]
) -> None:
    app, url = refusing_instance
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            url + "/events", content=body, headers={**headers, "authorization": "Bearer s3cret-token"}
        )

    assert response.status_code == 400, response.text
    assert_one_sentence(response.json()["error"])
    assert app.recorder.events == []
    assert await app.storage.subjects() == []


async def test_a_bad_batch_names_the_offending_event(instance: Instance) -> None:
    batch = [cloudevent("order-1"), cloudevent("order-2", data="text")]
    response = await instance.post_json(batch, BATCH)

    assert response.status_code == 400
    assert response.json()["error"].startswith("Event 1 of the batch")


async def test_a_rejected_request_is_logged_as_one_warning_line(
    instance: Instance, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="krules.ingress"):
        await instance.post(b"{", {"content-type": STRUCTURED})

    [record] = [r for r in caplog.records if r.name == "krules.ingress"]
    assert record.levelno == logging.WARNING
    assert "\n" not in record.getMessage()
    assert record.status == 400  # type: ignore[attr-defined]
    assert "not valid JSON" in record.reason  # type: ignore[attr-defined]


# -- size limit ------------------------------------------------------------------------------------
@pytest.fixture
async def small_instance() -> AsyncIterator[Instance]:
    app = app_with(Settings(ingress_max_bytes=1024))
    async with serve(app) as served:
        yield served
    await app.close()


async def test_a_body_over_the_limit_is_413_by_content_length(small_instance: Instance) -> None:
    response = await small_instance.post_json(cloudevent(data={"blob": "x" * 2000}))

    assert response.status_code == 413
    assert_one_sentence(response.json()["error"])
    assert "1024 bytes" in response.json()["error"]
    assert small_instance.app.recorder.events == []


async def test_a_streamed_body_over_the_limit_is_413_without_content_length(small_instance: Instance) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        body = json.dumps(cloudevent(data={"blob": "x" * 4000})).encode()
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    response = await small_instance.http.post(
        small_instance.url + "/events", content=chunks(), headers={"content-type": STRUCTURED}
    )

    assert response.status_code == 413
    assert small_instance.app.recorder.events == []


async def test_a_body_under_the_limit_is_accepted(small_instance: Instance) -> None:
    response = await small_instance.post_json(cloudevent(data={"blob": "x" * 100}))

    assert response.status_code == 200


# -- token -----------------------------------------------------------------------------------------
@pytest.fixture
async def guarded_instance() -> AsyncIterator[Instance]:
    app = app_with(Settings(ingress_token="s3cret-token"))
    async with serve(app) as served:
        yield served
    await app.close()


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token", "Basic czNjcmV0LXRva2Vu", "Bearer", "s3cret-token"]
)
async def test_a_missing_or_wrong_token_is_401_and_nothing_is_processed(
    refusing_instance: tuple[KRulesTestApp, str], authorization: str | None
) -> None:
    app, url = refusing_instance
    headers = {"content-type": STRUCTURED}
    if authorization is not None:
        headers["authorization"] = authorization
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(url + "/events", content=json.dumps(cloudevent()), headers=headers)

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert_one_sentence(response.json()["error"])
    assert app.recorder.events == []
    assert await app.storage.subjects() == []


async def test_the_right_token_is_accepted(guarded_instance: Instance) -> None:
    response = await guarded_instance.post_json(cloudevent(), authorization="Bearer s3cret-token")

    assert response.status_code == 200
    assert await guarded_instance.app.stored("order-1") == {"total": 30}


async def test_reading_a_subject_needs_the_token_but_healthz_does_not(guarded_instance: Instance) -> None:
    await guarded_instance.post_json(cloudevent(), authorization="Bearer s3cret-token")

    refused = await guarded_instance.http.get(guarded_instance.url + "/subjects/order-1")
    allowed = await guarded_instance.http.get(
        guarded_instance.url + "/subjects/order-1", headers={"authorization": "Bearer s3cret-token"}
    )
    health = await guarded_instance.http.get(guarded_instance.url + "/healthz")

    assert refused.status_code == 401
    assert allowed.status_code == 200
    assert health.status_code == 200


# -- storage failures ------------------------------------------------------------------------------
class UnavailableStorage(MemoryStorage):
    """A storage whose batch writes fail, as Redis does when it is down."""

    async def store(self, batch: Sequence[SubjectChanges]) -> None:
        raise StorageUnavailableError("Redis at 'redis://10.0.0.9:6379' did not answer after 3 retries.")


@pytest.fixture
async def failing_instance() -> AsyncIterator[Instance]:
    app = app_with(storage=UnavailableStorage())
    async with serve(app) as served:
        yield served
    await app.close()


async def test_a_storage_failure_is_503_telling_the_sender_to_retry(failing_instance: Instance) -> None:
    response = await failing_instance.post_json(cloudevent(id="lost-1"))

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert_one_sentence(error)
    assert "'lost-1'" in error
    assert "not lost" in error
    assert "retry" in error
    assert "did not answer after 3 retries" in error
    assert await failing_instance.stored_subjects() == []


async def test_a_storage_failure_in_a_batch_lists_the_events_to_retry(failing_instance: Instance) -> None:
    batch = [cloudevent("order-1", id="a"), cloudevent("unrouted", "nobody.listens", id="b")]
    response = await failing_instance.post_json(batch, BATCH)

    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["a"]
    assert body["ids"] == ["b"]  # no writes, so nothing to store: it was accepted
    assert_one_sentence(body["error"])


# -- reading subjects, health, unknown routes -------------------------------------------------------
async def test_a_subject_is_served_with_its_properties_and_extended_properties(instance: Instance) -> None:
    await instance.post_json(cloudevent("order/with slash", data={"total": 12}))

    response = await instance.http.get(instance.url + "/subjects/order%2Fwith%20slash")

    assert response.status_code == 200
    assert response.json() == {
        "name": "order/with slash",
        "properties": {"total": 12},
        "ext": {"seen_by": "ingress-test"},
    }


async def test_an_unknown_subject_is_404(instance: Instance) -> None:
    response = await instance.http.get(instance.url + "/subjects/nobody")

    assert response.status_code == 404
    assert response.json()["error"] == "Subject 'nobody' is not stored on this krules instance."


async def test_healthz_answers_ok(instance: Instance) -> None:
    response = await instance.http.get(instance.url + "/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_an_unknown_route_is_a_json_404_and_a_wrong_method_a_json_405(instance: Instance) -> None:
    missing = await instance.http.get(instance.url + "/nowhere")
    wrong_method = await instance.http.get(instance.url + "/events")

    assert missing.status_code == 404
    assert_one_sentence(missing.json()["error"])
    assert wrong_method.status_code == 405
    assert_one_sentence(wrong_method.json()["error"])


# -- serving lifecycle -----------------------------------------------------------------------------
async def test_a_turn_under_way_when_the_server_stops_is_finished_and_stored(
    krules_app: KRulesTestApp,
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    @krules_app.on("slow.job")
    async def slow(ctx: EventContext) -> None:
        entered.set()
        await release.wait()
        await ctx.subject.set("done", True)

    async with serve_in_background(krules_app.engine) as server, httpx.AsyncClient(timeout=10) as http:
        request = asyncio.ensure_future(
            http.post(
                server.url + "/events",
                content=json.dumps(cloudevent("job-1", "slow.job", id="slow-1")),
                headers={"content-type": STRUCTURED},
            )
        )
        await entered.wait()
        server.stop()
        await asyncio.sleep(0.3)  # lets the shutdown begin first (if it did not wait, the request would fail)
        release.set()
        response = await request

    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "ids": ["slow-1"]}
    assert await krules_app.stored("job-1") == {"done": True}


class UnreachableStorage(MemoryStorage):
    """A storage whose start-up check fails, as an unreachable Redis does."""

    async def check(self) -> None:
        raise StorageUnavailableError("Redis at 'redis://10.0.0.9:6379' could not answer a ping.")


async def test_a_server_whose_storage_is_unreachable_does_not_start_and_frees_its_port() -> None:
    server = KRulesServer(app_with(storage=UnreachableStorage()).engine, "127.0.0.1", 0)
    sock = server.bind()

    with pytest.raises(StorageUnavailableError, match="could not answer a ping"):
        await server.serve(sock)

    with socket.socket() as again:
        again.bind(("127.0.0.1", server.port))  # raises if the port were still held


async def test_a_busy_port_is_a_server_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(ServerError, match=f"Cannot listen on 127.0.0.1:{port} because the address is"):
            bind_socket("127.0.0.1", port)


class BrokenStorage(MemoryStorage):
    """A storage with a bug: it raises something that is not a StorageError."""

    async def store(self, batch: Sequence[SubjectChanges]) -> None:
        raise RuntimeError("a bug in the storage backend")


async def test_an_unexpected_error_is_500_naming_the_event_and_pointing_to_the_log() -> None:
    app = app_with(storage=BrokenStorage())
    async with serve(app) as served:
        response = await served.post_json(cloudevent(id="bug-1"))

    assert response.status_code == 500
    assert response.json()["failed"] == ["bug-1"]
    assert_one_sentence(response.json()["error"])
    assert "'bug-1'" in response.json()["error"]
