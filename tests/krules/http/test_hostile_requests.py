"""Hostile requests to the ingress, over a real loopback socket: each is a 400 with one sentence (never a
500 or a traceback), nothing of it is processed, and the instance goes on serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest

from krules.config import Settings
from krules.context import EventContext
from krules.decoding import MAX_EVENT_BYTES, MAX_NESTING
from krules.http.server import serve_in_background
from krules.testing import KRulesTestApp

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
DEEP = "[" * 100_000 + "]" * 100_000


def cloudevent(subject: str = "order-1", **fields: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{subject}-1",
        "source": "tests",
        "type": "order.placed",
        "subject": subject,
        "data": {"total": 30},
        **fields,
    }


def binary(subject: str | bytes = "order-1", **headers: str | bytes) -> dict[str, str | bytes]:
    return {
        "ce-specversion": "1.0",
        "ce-id": "bin-1",
        "ce-source": "tests",
        "ce-type": "order.placed",
        "ce-subject": subject,
        "content-type": "application/json",
        **headers,
    }


def nested(levels: int) -> Any:
    data: dict[str, Any] = {}
    for _ in range(levels - 1):
        data = {"a": data}
    return data


def utf8_subject(subject: bytes) -> bytes:
    return json.dumps(cloudevent("SUBJECT")).encode().replace(b"SUBJECT", subject)


HOSTILE: Sequence[tuple[str, bytes | str, dict[str, str | bytes], str]] = [
    ("structured JSON nested 100000 deep", DEEP, {"content-type": STRUCTURED}, "nests arrays and objects"),
    ("batch JSON nested 100000 deep", DEEP, {"content-type": BATCH}, "nests arrays and objects"),
    ("binary data nested 100000 deep", DEEP, binary(), "nests arrays and objects"),
    (
        "data nested one level too deep",
        json.dumps(cloudevent(data=nested(MAX_NESTING + 1))),
        {"content-type": STRUCTURED},
        "nests arrays and objects",
    ),
    (
        "a lone surrogate in the subject",
        json.dumps(cloudevent("a\ud800")),
        {"content-type": STRUCTURED},
        "lone surrogate",
    ),
    (
        "a lone surrogate in a batch's data key",
        json.dumps([cloudevent(), cloudevent("order-2", data={"k\udc00": 1})]),
        {"content-type": BATCH},
        "lone surrogate",
    ),
    (
        "a lone surrogate in binary data",
        json.dumps({"name": "\ud800"}),
        binary(),
        "lone surrogate",
    ),
    ("a subject that is not UTF-8", utf8_subject(b"\xff\xfe"), {"content-type": STRUCTURED}, "not UTF-8"),
    (
        "a surrogate encoded as UTF-8",
        utf8_subject(b"\xed\xa0\x80"),
        {"content-type": STRUCTURED},
        "not UTF-8",
    ),
    ("a UTF-16 body", json.dumps(cloudevent()).encode("utf-16"), {"content-type": STRUCTURED}, "not UTF-8"),
    ("a ce-subject header that is not UTF-8", b"{}", binary(b"\xff\xfe"), "not UTF-8"),
    ("a ce-subject percent-encoding bytes not UTF-8", b"{}", binary("a%FF%FE"), "not UTF-8"),
    (
        "NaN in the data",
        '{"specversion": "1.0", "id": "n", "source": "t", "type": "t", "subject": "s", "data": {"x": NaN}}',
        {"content-type": STRUCTURED},
        "not JSON",
    ),
]


@pytest.fixture
async def served(krules_app: KRulesTestApp) -> AsyncIterator[tuple[KRulesTestApp, str]]:
    @krules_app.on("order.placed")
    async def record(ctx: EventContext) -> None:
        await ctx.subject.set("total", ctx.payload.get("total"))

    async with serve_in_background(krules_app.engine) as server:
        yield krules_app, server.url


def placed(app: KRulesTestApp) -> list[str]:
    """The subjects of the ``order.placed`` events processed."""
    return [event.subject for event in app.recorder.events if event.type == "order.placed"]


async def post(url: str, body: bytes | str, headers: dict[str, str | bytes]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(url + "/events", content=body, headers=headers)


@pytest.mark.parametrize(("case", "body", "headers", "words"), HOSTILE, ids=[case for case, *_ in HOSTILE])
async def test_a_hostile_request_is_400_in_one_sentence_and_nothing_is_processed(
    served: tuple[KRulesTestApp, str],
    case: str,
    body: bytes | str,
    headers: dict[str, str | bytes],
    words: str,
) -> None:
    app, url = served

    response = await post(url, body, headers)
    after = await post(url, json.dumps(cloudevent("order-after")), {"content-type": STRUCTURED})

    assert response.status_code == 400, response.text
    reason = response.json()["error"]
    assert words in reason, reason
    assert reason[:1].isupper() and reason.endswith(".") and "\n" not in reason and len(reason) < 600
    assert after.status_code == 200  # still serving
    assert placed(app) == ["order-after"]


async def test_a_subject_sent_as_raw_utf8_in_a_header_is_decoded_not_mangled(
    served: tuple[KRulesTestApp, str],
) -> None:
    app, url = served

    response = await post(url, b'{"total": 1}', binary("caf\xc3\xa9".encode("latin-1")))
    encoded = await post(url, b'{"total": 2}', binary("caf%C3%A9", **{"ce-id": "bin-2"}))

    assert (response.status_code, encoded.status_code) == (200, 200)
    assert placed(app) == ["café", "café"]


async def test_data_nested_to_the_limit_is_accepted(served: tuple[KRulesTestApp, str]) -> None:
    app, url = served

    response = await post(url, json.dumps(cloudevent(data=nested(MAX_NESTING))), {"content-type": STRUCTURED})

    assert response.status_code == 200, response.text
    assert app.recorder.events[0].data == nested(MAX_NESTING)


@pytest.fixture
async def roomy() -> AsyncIterator[tuple[KRulesTestApp, str]]:
    """An instance whose ingress takes bodies of 4 MiB (batches larger than one event)."""
    app = KRulesTestApp(settings=Settings(ingress_max_bytes=4 * MAX_EVENT_BYTES))
    try:
        async with serve_in_background(app.engine) as server:
            yield app, server.url
    finally:
        await app.close()


async def test_an_event_over_the_size_limit_is_refused_even_when_the_body_limit_is_larger(
    roomy: tuple[KRulesTestApp, str],
) -> None:
    app, url = roomy
    half = "x" * (MAX_EVENT_BYTES // 2)

    too_big = await post(url, json.dumps(cloudevent(data={"x": half * 3})), {"content-type": STRUCTURED})
    in_batch = await post(
        url, json.dumps([cloudevent(), cloudevent(data={"x": half * 3})]), {"content-type": BATCH}
    )
    fine = await post(
        url,
        json.dumps([cloudevent("a", data={"x": half}), cloudevent("b", data={"x": half})]),
        {"content-type": BATCH},
    )

    assert (too_big.status_code, in_batch.status_code) == (400, 400)
    assert f"more than the {MAX_EVENT_BYTES}" in too_big.json()["error"]
    assert in_batch.json()["error"].startswith("Event 1 of the batch")
    assert fine.status_code == 200, fine.text
    assert sorted(event.subject for event in app.recorder.events) == ["a", "b"]


async def test_an_unforeseen_failure_decoding_a_request_is_a_400_not_a_500(
    served: tuple[KRulesTestApp, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from krules.http import ingress

    def unforeseen(obj: object) -> None:
        raise LookupError("nobody thought of this")

    app, url = served
    monkeypatch.setattr(ingress, "event_from_dict", unforeseen)

    response = await post(url, json.dumps(cloudevent()), {"content-type": STRUCTURED})

    assert response.status_code == 400
    assert response.json()["error"] == (
        "The request could not be decoded as a CloudEvent (LookupError: nobody thought of this)."
    )
    assert placed(app) == []
