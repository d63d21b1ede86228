"""``krules*`` extensions are the engine's own: the ingress refuses them over a real socket (so a
sender cannot replay, aim a replay at a subject or set the cascade depth), and the clients refuse
to send them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from krules.context import EventContext
from krules.dead_letters import DeadLetter, DeadLetters
from krules.errors import EventFormatError
from krules.events import Event
from krules.http.client import AsyncKRulesClient, KRulesClient
from krules.http.server import serve_in_background
from krules.testing import KRulesTestApp
from krules.transport.stream_client import AsyncStreamClient, StreamClient
from middleware.dead_letter import DeadLetterMiddleware

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


class Served:
    """An instance with a dead letter and a user subject called ``dlq-userdata``, served on loopback."""

    def __init__(self, app: KRulesTestApp, url: str, record: DeadLetter, calls: list[str]) -> None:
        self.app = app
        self.url = url
        self.record = record
        self.calls = calls

    async def post(self, body: Any, content_type: str = STRUCTURED, **headers: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as http:
            return await http.post(
                self.url + "/events",
                content=json.dumps(body),
                headers={"content-type": content_type, **headers},
            )


@pytest.fixture
async def served(krules_app: KRulesTestApp) -> AsyncIterator[Served]:
    krules_app.middleware(DeadLetterMiddleware())
    calls: list[str] = []

    @krules_app.on("order.submitted")
    async def charge(ctx: EventContext) -> None:
        calls.append(ctx.event_id)
        if ctx.payload.get("fail"):
            raise ConnectionError("payment gateway down")

    await krules_app.emit("order.submitted", "order-1", {"fail": True})
    (record,) = await DeadLetters(krules_app.storage).list()
    await krules_app.storage.set("dlq-userdata", "owner", '"ada"')
    async with serve_in_background(krules_app.engine) as server:
        yield Served(krules_app, server.url, record, calls)


def structured(**extensions: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "spoof-1",
        "source": "outsider",
        "type": "order.submitted",
        "subject": "order-1",
        "data": {},
        **extensions,
    }


async def assert_nothing_happened(served: Served) -> None:
    assert served.calls == [served.record.event_id]
    assert await DeadLetters(served.app.storage).list() == [served.record]
    assert await served.app.storage.load("dlq-userdata") == ({"owner": "ada"}, {})


@pytest.mark.parametrize(
    "extensions",
    [
        {"krulesreplay": "tests.charge", "krulesdlq": "RECORD"},
        {"krulesreplay": "tests.charge", "krulesdlq": "dlq-userdata"},
        {"krulesdlq": "dlq-userdata"},
        {"krulesdepth": 31},
        {"krulesanything": "x"},
    ],
    ids=["replay", "replay-aimed-at-a-user-subject", "dead-letter-alone", "depth", "unknown"],
)
async def test_a_structured_event_with_a_krules_extension_is_400_and_changes_nothing(
    served: Served, extensions: dict[str, Any]
) -> None:
    extensions = {k: served.record.name if v == "RECORD" else v for k, v in extensions.items()}
    response = await served.post(structured(**extensions))

    assert response.status_code == 400
    name = next(iter(extensions))
    assert response.json()["error"] == (
        f"The event carries the extension {name!r}; extensions named krules* are the krules engine's "
        "own and are not accepted from senders."
    )
    await assert_nothing_happened(served)


async def test_a_binary_event_with_a_krules_header_is_400(served: Served) -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "spoof-2",
        "ce-source": "outsider",
        "ce-type": "order.submitted",
        "ce-subject": "order-1",
        "ce-krulesreplay": "tests.charge",
        "ce-krulesdlq": served.record.name,
    }
    response = await served.post({}, "application/json", **headers)

    assert response.status_code == 400
    assert "'krulesreplay'" in response.json()["error"]
    await assert_nothing_happened(served)


async def test_a_batch_naming_the_event_with_a_krules_extension_is_refused_whole(served: Served) -> None:
    batch = [structured(id="fine-1"), structured(id="spoof-3", krulesdlq=served.record.name)]
    response = await served.post(batch, BATCH)

    assert response.status_code == 400
    assert response.json()["error"].startswith(
        "Event 1 of the batch (counting from 0) carries the extension 'krulesdlq'"
    )
    await assert_nothing_happened(served)


async def test_the_http_clients_refuse_to_send_a_krules_extension(served: Served) -> None:
    with KRulesClient(served.url) as client, pytest.raises(EventFormatError, match="'krulesreplay'"):
        client.emit("order.submitted", "order-1", {}, krulesreplay="tests.charge")
    async with AsyncKRulesClient(served.url) as async_client:
        with pytest.raises(EventFormatError, match="'krulesdlq'"):
            await async_client.emit_batch([{"type": "t", "subject": "s", "krulesdlq": "dlq-userdata"}])
    await assert_nothing_happened(served)


UNREACHABLE = "redis://127.0.0.1:9/0"  # nothing is sent, so nothing needs to listen


def test_the_stream_client_refuses_to_send_a_krules_extension_before_connecting() -> None:
    with StreamClient(UNREACHABLE) as client, pytest.raises(EventFormatError, match="'krulesreplay'"):
        client.emit("order.submitted", "order-1", {}, krulesreplay="tests.charge")


async def test_the_async_stream_client_refuses_events_built_with_krules_attributes() -> None:
    forged = Event("order.submitted", "order-1", {}, "x-1", "outsider", 0.0, extensions={"krulesdlq": "x"})
    deep = Event("order.submitted", "order-1", {}, "x-2", "outsider", 0.0, depth=5)
    async with AsyncStreamClient(UNREACHABLE) as async_client:
        for event, name in ((forged, "krulesdlq"), (deep, "krulesdepth")):
            with pytest.raises(EventFormatError, match=f"'{name}'"):
                await async_client.send([event])
