"""The stream entry format: events encoded and decoded strictly; a delivery whatever an entry holds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from krules.decoding import MAX_EVENT_BYTES
from krules.errors import EventFormatError
from krules.events import event_from_dict
from krules.transport import base
from krules.transport.base import decode_entry, delivery_of, encode_entry


def event(**overrides: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "e-1",
        "source": "tests",
        "type": "order.submitted",
        "subject": "order-1",
        "data": {"total": 10},
        **overrides,
    }


def test_an_entry_is_decoded_strictly_from_text_or_bytes() -> None:
    text = json.dumps(event(subject="café"), ensure_ascii=False)
    assert decode_entry({"event": text}).subject == decode_entry({"event": text.encode()}).subject == "café"
    with pytest.raises(EventFormatError, match="not UTF-8"):
        decode_entry({"event": text.encode().replace("é".encode(), b"\xe9")})


def test_a_delivery_of_an_entry_never_raises_whatever_decoding_does(monkeypatch: pytest.MonkeyPatch) -> None:
    def unforeseen(fields: object) -> None:
        raise LookupError("something nobody thought of")

    monkeypatch.setattr(base, "decode_entry", unforeseen)
    delivery = delivery_of(0, "1-0", {"event": "{}"}, deliveries=2)
    assert delivery.event is None and delivery.deliveries == 2
    assert delivery.problem == (
        "The stream entry could not be decoded (LookupError: something nobody thought of)."
    )


def test_an_event_its_entry_could_not_hold_is_refused_before_it_is_sent() -> None:
    big = event_from_dict(event(data={"x": "y" * MAX_EVENT_BYTES}))
    with pytest.raises(EventFormatError, match="more than the 1048576 an event may be"):
        encode_entry(big)
    made = event_from_dict(event())
    made.data = {"name": "\ud800", "n": float("nan")}  # what a handler might emit
    with pytest.raises(EventFormatError, match="cannot be sent as JSON"):
        encode_entry(made)
    made.data = {"name": "a\ud800"}
    with pytest.raises(EventFormatError, match=r"lone surrogate .* at \$\['data'\]\['name'\]"):
        encode_entry(made)
