"""The sync and async clients against a served instance: emit, batches, subjects and every failure."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from krules.client_events import build_event
from krules.config import Settings
from krules.context import EventContext
from krules.errors import EventFormatError, IngressError
from krules.http.client import AsyncKRulesClient, KRulesClient
from krules.http.server import ServerThread, serve_in_background
from krules.testing import KRulesTestApp


def order_app(settings: Settings | None = None) -> KRulesTestApp:
    app = KRulesTestApp(settings=settings)

    @app.on("order.placed")
    async def record(ctx: EventContext) -> None:
        await ctx.subject.set("total", ctx.payload["total"])
        await ctx.subject.set("tenant", ctx.event.get_extension("tenant"))

    return app


@pytest.fixture
def served() -> Iterator[tuple[KRulesTestApp, str]]:
    app = order_app()
    with ServerThread(app.engine) as server:
        yield app, server.url


@pytest.fixture
def guarded() -> Iterator[tuple[KRulesTestApp, str]]:
    app = order_app(Settings(ingress_token="t0ken", ingress_max_bytes=1024))
    with ServerThread(app.engine) as server:
        yield app, server.url


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- sync client -----------------------------------------------------------------------------------
def test_emit_returns_the_id_once_the_event_is_processed(served: tuple[KRulesTestApp, str]) -> None:
    app, url = served
    with KRulesClient(url) as client:
        event_id = client.emit("order.placed", "order-1", {"total": 30}, tenant="acme")
        subject = client.subject("order-1")

    ids = [e.id for e in app.recorder.events]
    assert ids[0] == event_id and len(ids) == 3
    assert all(child.startswith(f"{event_id}.") for child in ids[1:])  # children derive from it
    assert app.recorder.events[0].source == "krules-client"
    assert subject == {"name": "order-1", "properties": {"total": 30, "tenant": "acme"}, "ext": {}}


def test_emit_batch_returns_the_ids_in_order(served: tuple[KRulesTestApp, str]) -> None:
    app, url = served
    with KRulesClient(url + "/") as client:
        ids = client.emit_batch(
            [
                {"type": "order.placed", "subject": "order-1", "data": {"total": 1}},
                {"type": "order.placed", "subject": "order-2", "data": {"total": 2}, "tenant": "acme"},
            ]
        )
        second = client.subject("order-2")

    roots = {e.subject: e.id for e in app.recorder.events if e.type == "order.placed"}
    assert ids == [roots["order-1"], roots["order-2"]]
    assert second["properties"] == {"total": 2, "tenant": "acme"}


def test_a_missing_token_is_an_ingress_error_with_the_servers_reason(
    guarded: tuple[KRulesTestApp, str],
) -> None:
    app, url = guarded
    with KRulesClient(url) as client, pytest.raises(IngressError) as raised:
        client.emit("order.placed", "order-1", {"total": 30})

    assert raised.value.status == 401
    assert str(raised.value).startswith(f"The krules instance at {url} answered 401: ")
    assert "Authorization: Bearer" in str(raised.value)
    assert app.recorder.events == []


def test_the_token_is_sent_as_a_bearer_header(guarded: tuple[KRulesTestApp, str]) -> None:
    _, url = guarded
    with KRulesClient(url, token="t0ken") as client:
        client.emit("order.placed", "order-1", {"total": 30})
        assert client.subject("order-1")["properties"]["total"] == 30


def test_an_oversize_event_is_an_ingress_error_413(guarded: tuple[KRulesTestApp, str]) -> None:
    _, url = guarded
    with KRulesClient(url, token="t0ken") as client, pytest.raises(IngressError) as raised:
        client.emit("order.placed", "order-1", {"total": 1, "notes": "x" * 2000})

    assert raised.value.status == 413
    assert "larger than 1024 bytes" in str(raised.value)


def test_an_unknown_subject_is_an_ingress_error_404(served: tuple[KRulesTestApp, str]) -> None:
    _, url = served
    with KRulesClient(url) as client, pytest.raises(IngressError) as raised:
        client.subject("nobody")

    assert raised.value.status == 404
    assert "'nobody' is not stored" in str(raised.value)


def test_an_unreachable_instance_is_an_ingress_error_naming_the_url() -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    with KRulesClient(url) as client, pytest.raises(IngressError) as raised:
        client.emit("order.placed", "order-1")

    assert str(raised.value).startswith(f"Cannot reach the krules instance at {url}: ")
    assert str(raised.value).endswith(".")
    assert raised.value.status is None


@pytest.mark.parametrize(
    ("event_type", "subject", "data", "extensions"),
    [
        ("", "order-1", None, {}),
        ("order.placed", "", None, {}),
        ("order.placed", "order-1", ["not", "an", "object"], {}),
        ("order.placed", "order-1", None, {"Bad_Name": "x"}),
    ],
)
def test_an_invalid_event_is_refused_before_it_is_sent(
    event_type: str, subject: str, data: object, extensions: dict[str, str]
) -> None:
    with pytest.raises(EventFormatError):
        build_event(event_type, subject, data, **extensions)  # type: ignore[arg-type]


def test_a_payload_that_is_not_json_is_refused_before_it_is_sent(served: tuple[KRulesTestApp, str]) -> None:
    app, url = served
    with KRulesClient(url) as client, pytest.raises(EventFormatError, match="not JSON-serialisable"):
        client.emit("order.placed", "order-1", {"total": {1, 2}})

    assert app.recorder.events == []


def test_an_empty_batch_is_refused_before_it_is_sent(served: tuple[KRulesTestApp, str]) -> None:
    _, url = served
    with KRulesClient(url) as client, pytest.raises(EventFormatError, match="empty"):
        client.emit_batch([])


# -- async client ----------------------------------------------------------------------------------
@pytest.fixture
async def async_served() -> AsyncIterator[tuple[KRulesTestApp, str]]:
    app = order_app()
    async with serve_in_background(app.engine) as server:
        yield app, server.url


async def test_the_async_client_emits_and_reads_subjects(async_served: tuple[KRulesTestApp, str]) -> None:
    app, url = async_served
    async with AsyncKRulesClient(url) as client:
        event_id = await client.emit("order.placed", "order-1", {"total": 5})
        ids = await client.emit_batch([{"type": "order.placed", "subject": "order-2", "data": {"total": 6}}])
        subject = await client.subject("order-2")

    assert app.recorder.events[0].id == event_id
    assert len(ids) == 1
    assert await app.stored("order-1") == {"total": 5, "tenant": None}
    assert subject["properties"] == {"total": 6, "tenant": None}


async def test_the_async_client_reports_refusals_and_unreachable_instances(
    async_served: tuple[KRulesTestApp, str],
) -> None:
    _, url = async_served
    async with AsyncKRulesClient(url) as client:
        with pytest.raises(IngressError) as missing:
            await client.subject("nobody")
    async with AsyncKRulesClient(f"http://127.0.0.1:{unused_port()}") as client:
        with pytest.raises(IngressError, match=r"^Cannot reach the krules instance at "):
            await client.emit("order.placed", "order-1")

    assert missing.value.status == 404
