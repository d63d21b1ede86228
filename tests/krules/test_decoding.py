"""Strict decoding of event JSON: UTF-8 never replaced, no lone surrogates, bounded size and depth."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import pytest

from krules.decoding import MAX_EVENT_BYTES, MAX_NESTING, check_data, check_text, load_json
from krules.errors import EventFormatError


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


def nested(levels: int) -> Any:
    """Data ``levels`` deep: {"a": {"a": ... {} }} with the outer object as level 1."""
    data: dict[str, Any] = {}
    for _ in range(levels - 1):
        data = {"a": data}
    return data


def nested_tuples(levels: int) -> tuple[Any, ...]:
    value: tuple[Any, ...] = ()
    for _ in range(levels - 1):
        value = (value,)
    return value


def refusal(raw: str | bytes, **options: Any) -> str:
    with pytest.raises(EventFormatError) as caught:
        load_json(raw, "The text", **options)
    message = str(caught.value)
    assert message.startswith("The text ") and message.endswith(".") and "\n" not in message
    return message


def test_an_ordinary_event_parses_the_same_from_bytes_and_from_text() -> None:
    text = json.dumps(event(subject="café ☕", data={"emoji": "😀", "items": [{"n": i} for i in range(100)]}))
    assert load_json(text, "The text") == load_json(text.encode(), "The text") == json.loads(text)


def test_bytes_that_are_not_utf8_are_refused_never_replaced() -> None:
    for bad in (b"\xff\xfe", b"\xfe\xff", b"\xed\xa0\x80", b"\xc3"):
        text = json.dumps(event(subject="SUBJECT")).encode().replace(b"SUBJECT", bad)
        assert "is not UTF-8" in refusal(text)


def test_a_lone_surrogate_is_refused_in_any_string_but_a_pair_is_text() -> None:
    for place in (
        event(subject="a\ud800"),
        event(type="\udc00"),
        event(id="x\udbff"),
        event(data={"k": ["ok", {"deep": "\ud800"}]}),
        event(data={"key\udfff": 1}),
        event(traceparent="\ud800"),
    ):
        assert "lone surrogate" in refusal(json.dumps(place))  # escaped: ASCII text
    assert load_json(json.dumps(event(subject="\ud83d\ude00")), "The text")["subject"] == "😀"
    assert "lone surrogate" in refusal('{"subject": "a\ud800"}')  # in a Python str itself


def test_the_sentence_names_where_the_lone_surrogate_is() -> None:
    message = refusal(json.dumps(event(data={"items": [{"name": "x\ud800"}]})))
    assert "$['data']['items'][0]['name']" in message and "'\\ud800'" in message


def test_an_escaped_backslash_before_u_is_plain_text() -> None:
    assert load_json(r'{"subject": "\\ud800"}', "The text") == {"subject": "\\ud800"}


def test_data_nested_to_the_limit_is_taken_and_one_level_more_is_refused() -> None:
    assert load_json(json.dumps(event(data=nested(MAX_NESTING))), "The text")["data"] == nested(MAX_NESTING)
    assert "nests arrays and objects" in refusal(json.dumps(event(data=nested(MAX_NESTING + 1))))
    assert load_json(json.dumps(nested(MAX_NESTING)), "The text", envelopes=0) == nested(MAX_NESTING)
    batch = json.dumps([event(data=nested(MAX_NESTING))])
    assert "nests arrays and objects" not in str(load_json(batch, "The text", envelopes=2))
    assert "nests arrays and objects" in refusal(batch)  # a batch is one level more than an event


def test_json_nested_100000_deep_is_refused_in_a_sentence_not_a_recursion_error() -> None:
    for deep in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000):
        assert "nests arrays and objects" in refusal(deep)
        assert "nests arrays and objects" in refusal(deep.encode())


def test_many_brackets_side_by_side_are_not_depth() -> None:
    wide = event(data={"items": [{"n": [i]} for i in range(2_000)]})
    assert len(load_json(json.dumps(wide), "The text")["data"]["items"]) == 2_000


def test_an_event_over_the_size_limit_is_refused_counting_utf8_bytes() -> None:
    fits = json.dumps(event(data={"x": "é" * 10}), ensure_ascii=False)
    padding = MAX_EVENT_BYTES - len(fits.encode())
    at_limit = fits.replace("é" * 10, "é" * 10 + "x" * padding)
    assert len(at_limit.encode()) == MAX_EVENT_BYTES
    assert load_json(at_limit, "The text")["data"]["x"].startswith("é")
    over = at_limit.replace("x", "é", 1)  # one character, two bytes
    assert f"is {MAX_EVENT_BYTES + 1} bytes" in refusal(over)
    assert f"is {MAX_EVENT_BYTES + 1} bytes" in refusal(over.encode())
    assert load_json(over, "The text", max_bytes=2 * MAX_EVENT_BYTES)  # a request body may be larger


def test_nan_infinity_and_unreadable_numbers_are_refused() -> None:
    for constant in ("NaN", "Infinity", "-Infinity"):
        assert f"holds {constant}, which is not JSON" in refusal('{"data": {"x": ' + constant + "}}")
    assert "a number krules cannot read" in refusal('{"data": {"x": ' + "9" * 5_000 + "}}")


def test_data_built_in_python_is_checked_the_same_way() -> None:
    check_data({"a": [1, "é", {"b": None}], "n": 1.5})
    for bad, words in (
        ({"a": "\ud800"}, "lone surrogate"),
        ({"\udc00": 1}, "lone surrogate"),
        (nested(MAX_NESTING + 1), "nests arrays and objects"),
        ({"x": [float("nan")]}, "nan at data['x'][0]"),
        ({"x": float("inf")}, "inf at data['x']"),
        ({"t": nested_tuples(MAX_NESTING)}, "nests arrays and objects"),  # JSON arrays all the same
        (OrderedDict(name="\ud800"), "lone surrogate"),
    ):
        with pytest.raises(EventFormatError, match=words.replace("[", r"\[").replace("]", r"\]")):
            check_data(bad)
    with pytest.raises(EventFormatError, match="The event's subject holds a lone surrogate"):
        check_text("a\ud800", "The event's subject")
