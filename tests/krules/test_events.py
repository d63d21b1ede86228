"""Events: CloudEvents at the boundary, cheap deterministic ids inside."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cloudevents.core.v1.event import CloudEvent

from krules.errors import EventFormatError
from krules.events import DEPTH_EXTENSION, Event, IdGenerator, event_from_cloudevent, event_from_dict


def structured(**overrides: object) -> dict[str, object]:
    event: dict[str, object] = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "tests",
        "type": "order.submitted",
        "subject": "order-1",
        "time": "2026-11-21T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {"total": 10},
    }
    event.update(overrides)
    return {k: v for k, v in event.items() if v is not None}


def test_a_structured_cloudevent_becomes_an_event() -> None:
    event = event_from_dict(structured(traceparent="00-abc-def-01"))
    assert (event.type, event.subject, event.id, event.data) == (
        "order.submitted",
        "order-1",
        "e-1",
        {"total": 10},
    )
    assert event.time == datetime(2026, 11, 21, 10, tzinfo=UTC).timestamp()
    assert event.extensions == {"traceparent": "00-abc-def-01"}
    assert event.depth == 0


def test_the_depth_extension_is_carried_both_ways() -> None:
    event = event_from_dict(structured(**{DEPTH_EXTENSION: 4}))
    assert event.depth == 4
    assert event.to_dict()[DEPTH_EXTENSION] == 4


def test_an_event_round_trips_through_the_cloudevents_sdk() -> None:
    event = Event(
        "order.shipped", "order-1", {"n": 1}, "id-1", "krules", 1_700_000_000.0, extensions={"x1": "y"}
    )
    ce = event.to_cloudevent()
    assert isinstance(ce, CloudEvent)
    assert ce.get_subject() == "order-1" and ce.get_data() == {"n": 1} and ce.get_extension("x1") == "y"
    back = event_from_cloudevent(ce)
    assert (back.type, back.subject, back.id, back.data, back.time) == (
        "order.shipped",
        "order-1",
        "id-1",
        {"n": 1},
        1_700_000_000.0,
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"type": None}, "no 'type'"),
        ({"id": ""}, "'id'"),
        ({"subject": None}, "no 'subject'"),
        ({"specversion": "0.3"}, "specversion"),
        ({"data": [1, 2]}, "JSON object"),
        ({"data": "not json"}, "not valid JSON"),
        ({"time": "yesterday"}, "RFC 3339"),
        ({DEPTH_EXTENSION: "deep"}, "not an integer"),
    ],
)
def test_malformed_events_are_refused_with_one_sentence(overrides: dict[str, object], reason: str) -> None:
    with pytest.raises(EventFormatError, match=reason) as info:
        event_from_dict(structured(**overrides))
    assert str(info.value).count("\n") == 0 and str(info.value).endswith(".")


def test_a_non_object_is_not_a_cloudevent() -> None:
    with pytest.raises(EventFormatError, match="JSON object"):
        event_from_dict(["not", "an", "event"])


def test_root_ids_are_unique_per_instance_without_uuid4() -> None:
    ids = IdGenerator("abc")
    assert [ids(), ids()] == ["abc-1", "abc-2"]
    assert IdGenerator()() != IdGenerator()()


def test_child_ids_derive_from_the_parent_and_stay_bounded() -> None:
    event = Event("t", "s", {}, "root", "src", 0.0)
    first, second = event.child("t", "s", {}, 0.0, None, 1, "k"), event.child("t", "s", {}, 0.0, None, 2, "k")
    assert (first.id, second.id, first.depth, first.parent) == ("root.k-1", "root.k-2", 1, event)
    deep = event
    for _ in range(100):
        deep = deep.child("t", "s", {}, 0.0, None, 1, "abcdef")
    assert len(deep.id) <= 96
    assert deep.chain()[0] == "t(s)" and len(deep.chain()) == 101


@pytest.mark.parametrize("time", ["2026-11-21", "2026-11-21T10:00:00", "yesterday"])
def test_an_event_time_without_a_time_zone_is_refused(time: str) -> None:
    with pytest.raises(EventFormatError, match="time zone"):
        event_from_dict(structured(time=time))
