"""The Python clients refuse, before sending anything, an event an instance would refuse.

Each client here points at an address where nothing listens: an ``EventFormatError`` (rather than the
error of an unreachable instance) shows the event was refused before any connection was tried."""

from __future__ import annotations

from typing import Any

import pytest

from krules.client import AsyncKRulesClient, KRulesClient
from krules.client_events import build_event
from krules.decoding import MAX_EVENT_BYTES, MAX_NESTING
from krules.errors import EventFormatError
from krules.transport.stream_client import AsyncStreamClient

NOWHERE_HTTP = "http://127.0.0.1:9"
NOWHERE_REDIS = "redis://127.0.0.1:9/0"


def nested(levels: int) -> Any:
    data: dict[str, Any] = {}
    for _ in range(levels - 1):
        data = {"a": data}
    return data


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("a lone surrogate in the subject", {"subject": "a\ud800"}, "lone surrogate"),
    ("a lone surrogate in the type", {"type": "t\udc00"}, "lone surrogate"),
    ("a lone surrogate in an extension", {"tenant": "\ud800"}, "lone surrogate"),
    ("a lone surrogate in a data key", {"data": {"k\ud800": 1}}, "lone surrogate"),
    ("data nested too deep", {"data": nested(MAX_NESTING + 1)}, "nests arrays and objects"),
    ("NaN in the data", {"data": {"x": float("nan")}}, "not JSON"),
    ("an event over the size limit", {"data": {"x": "y" * MAX_EVENT_BYTES}}, "more than the"),
]


def spec(**overrides: Any) -> dict[str, Any]:
    return {"type": "order.placed", "subject": "order-1", "data": {"total": 1}, **overrides}


@pytest.mark.parametrize(("case", "overrides", "words"), REFUSED, ids=[case for case, _, _ in REFUSED])
def test_the_http_client_refuses_before_sending(case: str, overrides: dict[str, Any], words: str) -> None:
    with KRulesClient(NOWHERE_HTTP) as client:
        with pytest.raises(EventFormatError, match=words):
            client.emit(**spec(**overrides))
        with pytest.raises(EventFormatError, match=words):
            client.emit_batch([spec(subject="fine"), spec(**overrides)])


@pytest.mark.parametrize(("case", "overrides", "words"), REFUSED, ids=[case for case, _, _ in REFUSED])
async def test_the_async_clients_refuse_before_sending(
    case: str, overrides: dict[str, Any], words: str
) -> None:
    async with AsyncKRulesClient(NOWHERE_HTTP) as http, AsyncStreamClient(NOWHERE_REDIS) as streams:
        for client in (http, streams):
            with pytest.raises(EventFormatError, match=words):
                await client.emit(**spec(**overrides))
            with pytest.raises(EventFormatError, match=words):
                await client.emit_batch([spec(subject="fine"), spec(**overrides)])


def test_an_event_within_the_limits_is_built() -> None:
    data = {**nested(MAX_NESTING), "x": 1.5}
    event = build_event("order.placed", "café 😀", data, tenant="ü")
    assert (event.get_subject(), event.get_data()) == ("café 😀", data)
