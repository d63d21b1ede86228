"""What ``emit`` checks in an event it is handed: the payload, the extensions, JSON-ability.

The engine runs them on every emit, so a bad event is refused by the ``emit`` call that made it;
the usual cases (a plain dict of scalars, no extensions) return early.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from krules.errors import EventFormatError
from krules.events import DEAD_LETTER_EXTENSION, DEPTH_EXTENSION, REPLAY_EXTENSION

__all__ = ["EXTENSION_NAME", "RESERVED_NAMES", "check_extensions", "check_json", "check_payload"]

EXTENSION_NAME: Final = re.compile(r"^[a-z0-9]{1,20}$")
"""What a CloudEvents extension name may be: 1-20 lowercase letters or digits."""
RESERVED_NAMES: Final = frozenset(
    {
        "id",
        "source",
        "type",
        "subject",
        "time",
        "specversion",
        "datacontenttype",
        "dataschema",
        "data",
        DEPTH_EXTENSION,
        REPLAY_EXTENSION,
        DEAD_LETTER_EXTENSION,
    }
)
"""Attribute names an extension may not take: the CloudEvents core ones and those krules sets."""


def check_payload(payload: Any) -> dict[str, Any]:
    """An emitted payload as a dict: None is ``{}``, a dict subclass is copied, anything else refused."""
    if payload is None:
        return {}
    if type(payload) is not dict:
        if isinstance(payload, dict):
            return dict(payload)
        raise EventFormatError(
            f"An event payload must be a dict (a JSON object), not {type(payload).__name__}: {payload!r}."
        )
    return payload


def check_extensions(extensions: dict[str, Any]) -> dict[str, Any] | None:
    """Extensions passed to ``emit``, checked against the CloudEvents rules (None when empty)."""
    for name, value in extensions.items():
        if not EXTENSION_NAME.match(name):
            raise EventFormatError(
                f"CloudEvents extension name {name!r} is invalid; use 1-20 lowercase letters or digits."
            )
        if name in RESERVED_NAMES:
            raise EventFormatError(
                f"{name!r} is a CloudEvents attribute krules sets; it cannot be an extension."
            )
        if not isinstance(value, str | int):  # bool is an int
            raise EventFormatError(
                f"CloudEvents extension {name!r} must be a string, integer or boolean, not {value!r}."
            )
    return extensions or None


_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def check_json(event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` itself, once it is known to encode as JSON (it will cross a boundary as JSON)."""
    for value in payload.values():  # flat payloads of scalars (the usual case) need no encoding
        if value.__class__ not in _SCALARS or value != value:  # NaN is not JSON
            break
    else:
        return payload
    try:
        json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EventFormatError(f"The payload of {event_type!r} is not JSON-serialisable: {exc}") from None
    return payload
