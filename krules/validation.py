"""What ``emit`` checks in an event it is handed: the payload, the extensions, JSON-ability.

The engine runs them on every emit, so a bad event is refused by the ``emit`` call that made it;
the usual cases (a plain dict of scalars, no extensions) return early.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from krules.errors import EventFormatError
from krules.events import DEAD_LETTER_EXTENSION, DEPTH_EXTENSION, REPLAY_EXTENSION, Event

__all__ = [
    "EXTENSION_NAME",
    "RESERVED_NAMES",
    "RESERVED_PREFIX",
    "check_extensions",
    "check_json",
    "check_payload",
    "reserved_attribute",
    "split_emit_keywords",
]

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
RESERVED_PREFIX: Final = "krules"
"""Extensions named ``krules...`` are the engine's own (``krulesdepth``, ``krulesreplay``,
``krulesdlq``, ``krulesreplaysig``): ``emit`` refuses them, and so do the ingress and the clients."""


def reserved_attribute(event: Event) -> str | None:
    """The first ``krules*`` attribute ``event`` carries (``krulesdepth`` when its depth is not 0),
    or None: what an event from outside may not carry, since those attributes steer the engine."""
    extensions = event.extensions
    if extensions:
        for name in extensions:
            if name.startswith(RESERVED_PREFIX):
                return name
    return DEPTH_EXTENSION if event.depth else None


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
        if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIX):
            raise EventFormatError(
                f"{name!r} is a CloudEvents attribute krules sets; it cannot be an extension "
                f"(names starting with {RESERVED_PREFIX!r} are the engine's own)."
            )
        if not isinstance(value, str | int):  # bool is an int
            raise EventFormatError(
                f"CloudEvents extension {name!r} must be a string, integer or boolean, not {value!r}."
            )
    return extensions or None


LOCAL_ONLY_NAMES: Final = frozenset({"dataschema"})
"""Reserved names ``emit`` still takes as local metadata: CloudEvents attributes krules never sets,
which KRules code passes to ``emit`` for middleware to read (so nothing of the event is overridden)."""


def split_emit_keywords(
    keywords: dict[str, Any],
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    """``emit``'s keyword arguments as (CloudEvents extensions, local metadata, ``extra``).

    As in KRules, every keyword is metadata that the emitted event's handlers (and their middleware)
    read with ``ctx.get_metadata``.  Those that can be CloudEvents extensions (a valid name, a
    string, integer or boolean value) also travel with the event; the others (``dispatch_url=``, a
    dict value...) stay with the event in this process.  ``extra=`` is what handlers read as
    ``ctx.extra``.  A core attribute or a ``krules*`` name is refused: a keyword never overrides them.
    """
    extensions: dict[str, Any] = {}
    local: dict[str, Any] = {}
    extra: dict[str, Any] | None = None
    for name, value in keywords.items():
        if name == "extra":
            if value is not None and not isinstance(value, dict):
                raise EventFormatError(
                    f"extra= of emit must be a dict (its handlers read it as ctx.extra), not {value!r}."
                )
            extra = value
        elif name in LOCAL_ONLY_NAMES:
            local[name] = value
        elif name in RESERVED_NAMES or name.lower().startswith(RESERVED_PREFIX):
            raise EventFormatError(
                f"{name!r} is a CloudEvents attribute krules sets; it cannot be an extension "
                f"(names starting with {RESERVED_PREFIX!r} are the engine's own)."
            )
        elif EXTENSION_NAME.match(name) and isinstance(value, str | int):  # bool is an int
            extensions[name] = value
        else:
            local[name] = value
    return extensions or None, local or None, extra


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
