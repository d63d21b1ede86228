"""The CloudEvents a Python client sends, built from a type, a subject, a JSON-object payload and
extensions: one at a time or a batch.  Shared by the HTTP clients (:mod:`krules.http.client`) and
the stream clients (:mod:`krules.transport.stream_client`).

An event an instance would refuse (:mod:`krules.decoding`: a lone surrogate in a string, data
nested too deep, a non-finite number) is refused here, before anything is sent, with the same
:class:`~krules.errors.EventFormatError`; the clients check the size once the event is encoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.v1.event import CloudEvent

from krules.decoding import check_data, check_text
from krules.errors import EventFormatError
from krules.validation import RESERVED_PREFIX

__all__ = ["CLIENT_SOURCE", "build_event", "build_events"]

CLIENT_SOURCE: Final = "krules-client"


def build_event(
    event_type: str, subject: str, data: Mapping[str, Any] | None = None, **extensions: Any
) -> CloudEvent:
    """A CloudEvents 1.0 event for ``subject`` with a JSON-object payload (EventFormatError if invalid)."""
    if not isinstance(event_type, str) or not event_type:
        raise EventFormatError(f"An event type must be a non-empty string, not {event_type!r}.")
    if not isinstance(subject, str) or not subject:
        raise EventFormatError(f"An event's subject must be a non-empty string, not {subject!r}.")
    for name in extensions:
        if name.startswith(RESERVED_PREFIX):
            raise EventFormatError(
                f"Extension {name!r} cannot be sent: names starting with {RESERVED_PREFIX!r} are the "
                "krules engine's own, and instances refuse events that carry them."
            )
    if data is not None and not isinstance(data, Mapping):
        raise EventFormatError(
            f"An event payload must be a JSON object (a dict), not {type(data).__name__}: {data!r}."
        )
    check_text(event_type, "The event type")
    check_text(subject, "The event's subject")
    for name, value in extensions.items():
        if isinstance(value, str):
            check_text(value, f"The event's {name!r} extension")
    payload = dict(data) if data is not None else {}
    check_data(payload)
    attributes: dict[str, Any] = {
        "type": event_type,
        "source": CLIENT_SOURCE,
        "subject": subject,
        "datacontenttype": "application/json",
        **extensions,
    }
    try:
        # the SDK fills in specversion, time and a uuid4 id (fine at this boundary: one per send)
        return CloudEvent(attributes, payload)
    except BaseCloudEventException as exc:
        detail = str(exc).splitlines()[0].rstrip(".")
        raise EventFormatError(f"Cannot build a CloudEvent of type {event_type!r}: {detail}.") from None


def build_events(events: Iterable[Mapping[str, Any]]) -> list[CloudEvent]:
    """The CloudEvents of a batch: mappings with ``type``, ``subject``, optional ``data`` and extensions."""
    built = []
    for spec in events:
        fields = dict(spec)
        try:
            event_type = fields.pop("type")
            subject = fields.pop("subject")
        except KeyError as exc:
            raise EventFormatError(f"A batch entry needs a {exc.args[0]!r} key: {spec!r}.") from None
        data = fields.pop("data", None)
        built.append(build_event(event_type, subject, data, **fields))
    if not built:
        raise EventFormatError("The batch is empty; give emit_batch at least one event.")
    return built
