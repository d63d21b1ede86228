"""Reading the stream commands' replies, whichever connection they came on.

The storage's own connection replies in RESP2 (an entry's fields, ``XINFO`` rows: flat lists), a
redis-py client passed in with dicts, and either may carry ``bytes``; these functions give both as
text and dicts.  A stream entry's field values stay as they came (``str``, or ``bytes`` when they
are not UTF-8): the worker's strict decoding refuses bytes that are not UTF-8 rather than replacing
them (see :mod:`krules.decoding`).
"""

from __future__ import annotations

from typing import Any

from storage.redis._resp_connection import undecoded
from storage.redis.keys import CONSUMER_GROUP

__all__ = ["entry_fields", "fields", "flat_map", "group_info", "stream_entries", "stream_id", "text"]


def text(value: Any) -> str:
    """A reply item as ``str`` (undecodable bytes replaced, never raising)."""
    if type(value) is str:
        if value.isascii():
            return value
        value = undecoded(value)  # the C parser's escapes of bytes that are not UTF-8
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def fields(raw: Any) -> dict[str, str] | None:
    """An entry's fields as text, from RESP (a flat list) or redis-py (a dict); None if deleted."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        return {text(k): text(v) for k, v in raw.items()}
    pairs = iter(raw)
    return {text(k): text(v) for k, v in zip(pairs, pairs, strict=True)}


def entry_fields(raw: Any) -> dict[str, str | bytes] | None:
    """A stream entry's fields, names as text and values as received; None if deleted."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        return {text(k): _value(v) for k, v in raw.items()}
    pairs = iter(raw)
    return {text(k): _value(v) for k, v in zip(pairs, pairs, strict=True)}


def _value(value: Any) -> Any:
    """An entry's value as received: text, or bytes when it is not UTF-8 (whichever parser read it)."""
    return undecoded(value) if type(value) is str and not value.isascii() else value


def stream_entries(raw: Any) -> list[tuple[str, dict[str, str | bytes] | None]]:
    """The ``(entry id, fields)`` of an ``XREADGROUP``/``XAUTOCLAIM`` list of entries (see
    :func:`entry_fields`)."""
    return [(text(entry[0]), entry_fields(entry[1])) for entry in raw or ()]


def flat_map(raw: Any) -> dict[str, Any]:
    """One ``XINFO`` row as a dict with text keys (bytes values as text, numbers left as they are)."""
    if isinstance(raw, dict):
        return {text(k): v for k, v in raw.items()}
    pairs = iter(raw)
    return {text(k): (text(v) if isinstance(v, bytes) else v) for k, v in zip(pairs, pairs, strict=True)}


def group_info(groups: Any) -> dict[str, Any] | None:
    """The row of krules' consumer group in an ``XINFO GROUPS`` reply, or None."""
    for raw in groups or ():
        info = flat_map(raw)
        if text(info.get("name", "")) == CONSUMER_GROUP:
            return info
    return None


def stream_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<seq>``) as a tuple that sorts as the stream does."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
