"""Python clients of krules over an instance's HTTP ingress.

:class:`KRulesClient` / :class:`AsyncKRulesClient` post events built with the ``cloudevents`` SDK in
structured mode (one event) or batch mode (a list).  Every failure is an
:class:`~krules.errors.IngressError` with one sentence: the instance's own reason for a refused
request (with ``status`` set), or why it could not be reached (``status`` None)::

    with KRulesClient("http://127.0.0.1:8080", token="...") as client:
        event_id = client.emit("order.submitted", "order-1", {"total": 30})

An emitted event's id is returned once it is queued; sending the same event (same id) again is
harmless, its partition drops ids it has processed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import httpx
from cloudevents.core.bindings.http import to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from krules.client_events import build_event, build_events
from krules.decoding import MAX_EVENT_BYTES, shown
from krules.errors import EventFormatError, IngressError
from krules.http.ingress import BATCH_CONTENT_TYPE

__all__ = ["AsyncKRulesClient", "KRulesClient", "default_url"]

DEFAULT_URL: Final = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT: Final = 30.0

_FORMAT: Final = JSONFormat()


def default_url(host: str = "127.0.0.1", port: int = 8080) -> str:
    """The URL of an instance listening on ``host:port`` (a wildcard host is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _not_serialisable(event: CloudEvent, exc: Exception) -> EventFormatError:
    return EventFormatError(
        f"The payload of the {event.get_type()!r} event for {event.get_subject()!r} is not "
        f"JSON-serialisable ({exc}); send strings, numbers, booleans, None, lists or dicts."
    )


def _sized(event: CloudEvent, body: bytes) -> bytes:
    """``body``, the encoded ``event``, once it is known not to be over an event's size limit."""
    if len(body) > MAX_EVENT_BYTES:
        raise EventFormatError(
            f"The {event.get_type()!r} event for {shown(event.get_subject() or '')} is {len(body)} bytes "
            f"of JSON, more than the {MAX_EVENT_BYTES} an event may be; send smaller events."
        )
    return body


def _encode(event: CloudEvent) -> bytes:
    try:
        return _sized(event, _FORMAT.write(event))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, EventFormatError):
            raise
        raise _not_serialisable(event, exc) from None


def _single(
    event_type: str, subject: str, data: Mapping[str, Any] | None, extensions: dict[str, Any]
) -> tuple[bytes, str]:
    event = build_event(event_type, subject, data, **extensions)
    try:
        message = to_structured(event, _FORMAT)
    except (TypeError, ValueError) as exc:
        raise _not_serialisable(event, exc) from None
    return _sized(event, message.body), message.headers["content-type"]


def _batch(events: Iterable[Mapping[str, Any]]) -> bytes:
    return b"[" + b",".join(_encode(event) for event in build_events(events)) + b"]"


def _headers(token: str | None, content_type: str | None = None) -> dict[str, str]:
    headers = {"accept": "application/json"}
    if content_type is not None:
        headers["content-type"] = content_type
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    text = response.text.strip().splitlines()[0][:200] if response.text.strip() else response.reason_phrase
    return f"HTTP {response.status_code} {text}".rstrip(".") + "."


def _checked(url: str, response: httpx.Response) -> Any:
    if not 200 <= response.status_code < 300:
        raise IngressError(
            f"The krules instance at {url} answered {response.status_code}: {_reason(response)}",
            status=response.status_code,
        )
    try:
        return response.json()
    except ValueError:
        raise IngressError(
            f"The server at {url} did not answer with JSON; is it a krules instance?", response.status_code
        ) from None


def _unreachable(url: str, exc: httpx.TransportError) -> IngressError:
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return IngressError(f"Cannot reach the krules instance at {url}: {detail.rstrip('.')}.")
    return IngressError(f"The request to the krules instance at {url} failed: {detail.rstrip('.')}.")


def _query(values: Mapping[str, str | float | None]) -> dict[str, str]:
    return {name: str(value) for name, value in values.items() if value is not None}


def _records(url: str, answer: Any) -> list[dict[str, Any]]:
    records = answer.get("dead_letters") if isinstance(answer, dict) else None
    if not isinstance(records, list):
        raise IngressError(
            f"The server at {url} answered without dead letters; is it a krules instance?", 200
        )
    return [record for record in records if isinstance(record, dict)]


def _deleted(url: str, answer: Any) -> list[str]:
    names = answer.get("deleted") if isinstance(answer, dict) else None
    if not isinstance(names, list):
        raise IngressError(f"The server at {url} answered without the names deleted; is it krules?", 200)
    return [str(name) for name in names]


def _accepted_ids(url: str, answer: Any) -> list[str]:
    ids = answer.get("ids") if isinstance(answer, dict) else None
    if not isinstance(ids, list):
        raise IngressError(
            f"The server at {url} answered without accepted ids; is it a krules instance?", 200
        )
    return [str(i) for i in ids]


class KRulesClient:
    """Sends events to a krules instance, reads its subjects and manages its dead letters (blocking)."""

    def __init__(
        self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def emit(self, type: str, subject: str, data: Mapping[str, Any] | None = None, **extensions: Any) -> str:
        """Send one event; return its id once the instance has processed it (queued it, in Redis mode)."""
        body, content_type = _single(type, subject, data, extensions)
        answer = self._post(body, content_type)
        return _accepted_ids(self.url, answer)[0]

    def emit_batch(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Send several events (mappings with ``type``, ``subject``, optional ``data`` and extensions)."""
        return _accepted_ids(self.url, self._post(_batch(events), BATCH_CONTENT_TYPE))

    def subject(self, name: str) -> dict[str, Any]:
        """``{"name", "properties", "ext"}`` of a stored subject (IngressError 404 when unknown)."""
        try:
            response = self._http.get(f"/subjects/{quote(name, safe='')}", headers=_headers(self.token))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        answer: dict[str, Any] = _checked(self.url, response)
        return answer

    def dead_letters(self, **filters: str | float | None) -> list[dict[str, Any]]:
        """The instance's dead letters, oldest first (``handler``, ``type``, ``reason``, ``since``,
        ``until``: see :mod:`krules.http.dead_letters`)."""
        answer = self._request("GET", "/dead-letters", _query(filters))
        return _records(self.url, answer)

    def dead_letter(self, ident: str) -> dict[str, Any]:
        """One dead letter, by id, name or an unambiguous start of its id (IngressError 404 if none)."""
        answer: dict[str, Any] = self._request("GET", f"/dead-letters/{quote(ident, safe='')}")
        return answer

    def delete_dead_letters(self, ident: str | None = None, *, older_than: float | None = None) -> list[str]:
        """Delete dead letter ``ident``, or (None) every one that failed more than ``older_than``
        seconds ago (None: all); return the names deleted."""
        path = "/dead-letters" if ident is None else f"/dead-letters/{quote(ident, safe='')}"
        return _deleted(self.url, self._request("DELETE", path, _query({"older_than": older_than})))

    def _request(self, method: str, path: str, params: dict[str, str] | None = None) -> Any:
        try:
            response = self._http.request(method, path, params=params, headers=_headers(self.token))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        return _checked(self.url, response)

    def _post(self, body: bytes, content_type: str) -> Any:
        try:
            response = self._http.post("/events", content=body, headers=_headers(self.token, content_type))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        return _checked(self.url, response)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> KRulesClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncKRulesClient:
    """Sends events to a krules instance, reads its subjects and manages its dead letters (asyncio)."""

    def __init__(
        self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)

    async def emit(
        self, type: str, subject: str, data: Mapping[str, Any] | None = None, **extensions: Any
    ) -> str:
        """Send one event; return its id once the instance has processed it (queued it, in Redis mode)."""
        body, content_type = _single(type, subject, data, extensions)
        answer = await self._post(body, content_type)
        return _accepted_ids(self.url, answer)[0]

    async def emit_batch(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Send several events (mappings with ``type``, ``subject``, optional ``data`` and extensions)."""
        return _accepted_ids(self.url, await self._post(_batch(events), BATCH_CONTENT_TYPE))

    async def subject(self, name: str) -> dict[str, Any]:
        """``{"name", "properties", "ext"}`` of a stored subject (IngressError 404 when unknown)."""
        try:
            response = await self._http.get(f"/subjects/{quote(name, safe='')}", headers=_headers(self.token))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        answer: dict[str, Any] = _checked(self.url, response)
        return answer

    async def dead_letters(self, **filters: str | float | None) -> list[dict[str, Any]]:
        """The instance's dead letters, oldest first (see :meth:`KRulesClient.dead_letters`)."""
        return _records(self.url, await self._request("GET", "/dead-letters", _query(filters)))

    async def dead_letter(self, ident: str) -> dict[str, Any]:
        """One dead letter, by id, name or an unambiguous start of its id (IngressError 404 if none)."""
        answer: dict[str, Any] = await self._request("GET", f"/dead-letters/{quote(ident, safe='')}")
        return answer

    async def delete_dead_letters(
        self, ident: str | None = None, *, older_than: float | None = None
    ) -> list[str]:
        """Delete one dead letter, or purge (see :meth:`KRulesClient.delete_dead_letters`)."""
        path = "/dead-letters" if ident is None else f"/dead-letters/{quote(ident, safe='')}"
        return _deleted(self.url, await self._request("DELETE", path, _query({"older_than": older_than})))

    async def _request(self, method: str, path: str, params: dict[str, str] | None = None) -> Any:
        try:
            response = await self._http.request(method, path, params=params, headers=_headers(self.token))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        return _checked(self.url, response)

    async def _post(self, body: bytes, content_type: str) -> Any:
        try:
            response = await self._http.post(
                "/events", content=body, headers=_headers(self.token, content_type)
            )
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        return _checked(self.url, response)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncKRulesClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
