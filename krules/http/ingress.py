"""The HTTP ingress: CloudEvents in (binary, structured and batch modes), turns run, JSON out.

Routes of :func:`create_ingress_app`:

* ``POST /`` and ``POST /events``: one CloudEvent in binary mode (``ce-*`` headers, the body is the
  data) or structured mode (``application/cloudevents+json``), or a batch
  (``application/cloudevents-batch+json``, a JSON array).  The whole request is validated before
  any event is processed, so a malformed request (400) processes nothing; events are decoded
  strictly (:mod:`krules.decoding`: UTF-8 never replaced, no lone surrogates, an event at most
  1 MiB, data nested at most 64 levels), and whatever goes wrong decoding a request is a 400 with
  one sentence, never a 500.  Embedded mode: each
  event runs as a turn (a batch's events concurrently; the engine keeps one subject's events in
  order) and the answer, ``200 {"accepted": n, "ids": [...]}``, is sent once the turns are over.
  Redis mode (the engine has a transport): the events are appended to their partitions' streams,
  whichever instance owns them, and the answer is ``202 {"accepted": n, "ids": [...],
  "queued": true}`` once they are.  A handler failure is the rule's business (dead-lettered,
  logged), not the sender's; a storage failure is 503, because nothing was stored or queued and
  the sender must retry (the same ids: a partition drops an event it committed before).
* ``GET /subjects/{name}``: ``{"name", "properties", "ext"}`` of a stored subject (404 when unknown).
* ``/dead-letters``: list, show, delete and purge dead letters (:mod:`krules.http.dead_letters`).
* ``GET /healthz``: liveness, never behind the token: 503 with the reason while the transport
  reports a failure (in Redis mode: the last read of the owned partitions failed).

An event carrying a ``krules*`` extension (``krulesreplay``, ``krulesdlq``, ``krulesdepth``...)
is refused with 400: those are the engine's own (a replay is written by ``krules dlq replay``).

When ``KRULES_INGRESS_TOKEN`` is set, every route but ``/healthz`` needs ``Authorization: Bearer
<token>``: the routes passed to :func:`create_ingress_app` too (``/metrics``).  Bodies over
``KRULES_INGRESS_MAX_BYTES`` are refused with 413, by ``Content-Length`` and again while the body
streams in; a body not in within ``KRULES_HTTP_BODY_TIMEOUT`` is a 408 (and the connection is
closed).  Every error is ``{"error": "<one sentence>"}``.

Admission: before anything of a request is accepted, it is refused with ``503`` and ``Retry-After``
when accepting it would pass a bound on what waits: the request bytes accepted and not yet answered
(``KRULES_INGRESS_MAX_QUEUED_BYTES``), in embedded mode the turns waiting to run
(``KRULES_MAX_QUEUED_TURNS``), in Redis mode the unprocessed events of a partition stream it goes
to (``KRULES_MAX_STREAM_BACKLOG``, as the transport last measured it).  A bound lets one request in
when nothing waits, whatever its size.  Refusals are counted (:mod:`krules.http.stats`) and logged
at most once per ``REFUSAL_LOG_SECONDS``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, Final
from urllib.parse import unquote

from cloudevents.core.bindings.http import HTTPMessage, from_binary
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from starlette.applications import Starlette
from starlette.datastructures import URLPath
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Receive, Scope, Send

from krules.decoding import MAX_EVENT_BYTES, load_json
from krules.decoding import shown as shown_value
from krules.engine import Engine
from krules.errors import ConfigurationError, EventFormatError, OverloadedError, StorageError
from krules.events import Event, event_from_cloudevent, event_from_dict
from krules.http.dead_letters import dead_letter_routes
from krules.http.stats import LogEvery, ServerStats
from krules.turn import Turn
from krules.validation import RESERVED_PREFIX, reserved_attribute

__all__ = ["BATCH_CONTENT_TYPE", "STRUCTURED_CONTENT_TYPE", "create_ingress_app"]

logger = logging.getLogger("krules.ingress")  # its name before the re-layout, kept for logging configs

STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json"
BATCH_CONTENT_TYPE: Final = "application/cloudevents-batch+json"

_JSON_FORMAT: Final = JSONFormat()
_BINARY_REQUIRED: Final = ("specversion", "id", "source", "type", "subject")
_BODY_BYTES: Final = "krules.body_bytes"  # the scope key read_body records the body's size under

REFUSAL_LOG_SECONDS: Final = 10.0
"""At most one log line per this many seconds about requests refused by admission."""


class _Rejected(Exception):
    """A request the ingress refuses: an HTTP status and a one-sentence reason."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _lower_first(sentence: str) -> str:
    """Lower-case the first letter so a sentence reads as a clause ("The event" but not "CloudEvents")."""
    if len(sentence) > 1 and sentence[0].isupper() and sentence[1].islower():
        return sentence[0].lower() + sentence[1:]
    return sentence


def _clause(text: str) -> str:
    return text.strip().rstrip(".")


class _Ingress:
    """The request handlers, bound to one engine and its settings."""

    def __init__(self, engine: Engine, stats: ServerStats) -> None:
        self.engine = engine
        settings = engine.settings
        self.max_bytes = settings.ingress_max_bytes
        self.token = settings.ingress_token.encode() if settings.ingress_token else None
        self.stats = stats
        self.max_queued_bytes = settings.ingress_max_queued_bytes
        self.max_queued_turns = settings.max_queued_turns
        self.body_timeout = settings.http_body_timeout
        self._refusals = LogEvery(logger, REFUSAL_LOG_SECONDS)
        self._starting = 0  # turns admitted whose task has not started yet (not in engine.queued)
        self._abandoned = False
        # Turns run in their own tasks, shielded from a cancelled request (client gone, forced
        # shutdown), so a turn is never cut in the middle of its cascade or its commit.
        self._turns: set[asyncio.Future[Any]] = set()

    # -- request checks --------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization")
        challenge = {"WWW-Authenticate": 'Bearer realm="krules"'}
        if header is None:
            raise _Rejected(
                401,
                "This krules instance requires an 'Authorization: Bearer <token>' header with its ingress "
                "token (KRULES_INGRESS_TOKEN).",
                challenge,
            )
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode(), self.token):
            raise _Rejected(
                401,
                "The bearer token in the Authorization header is not this instance's ingress token.",
                challenge,
            )

    async def read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise _Rejected(400, f"The Content-Length header {declared!r} is not a number.") from None
            if length > self.max_bytes:
                raise self.too_large()
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise self.too_large()
                    chunks.append(chunk)
        except TimeoutError:
            self.stats.timeouts["body"] += 1
            raise _Rejected(
                408,
                f"The request body did not arrive within {self.body_timeout:g} seconds "
                "(KRULES_HTTP_BODY_TIMEOUT); send it at once, or in smaller requests.",
                {"Connection": "close"},
            ) from None
        request.scope[_BODY_BYTES] = size
        return b"".join(chunks)

    def too_large(self) -> _Rejected:
        return _Rejected(
            413,
            f"The request body is larger than {self.max_bytes} bytes (KRULES_INGRESS_MAX_BYTES); "
            "send smaller batches or raise the limit.",
        )

    # -- admission -------------------------------------------------------------------------------
    def check_room(self, turns: int, size: int) -> None:
        """Raise OverloadedError when ``turns`` more turns (embedded) or ``size`` more request bytes
        would pass their bound; each bound lets a request in when nothing waits."""
        queued_bytes = self.stats.queued_bytes
        if queued_bytes and queued_bytes + size > self.max_queued_bytes:
            raise OverloadedError(
                f"This krules instance holds {queued_bytes} bytes of requests not yet answered and "
                f"{size} more would pass KRULES_INGRESS_MAX_QUEUED_BYTES={self.max_queued_bytes}; "
                "nothing of the request was accepted, so retry it after the time in Retry-After.",
                "queued_bytes",
            )
        engine = self.engine
        if engine.transport is None:
            queued = engine.queued + self._starting
            if queued and queued + turns > self.max_queued_turns:
                raise OverloadedError(
                    f"This krules instance has {queued} turns waiting to run and {turns} more would pass "
                    f"KRULES_MAX_QUEUED_TURNS={self.max_queued_turns}; nothing of the request was "
                    "accepted, so retry it after the time in Retry-After.",
                    "queued_turns",
                )

    def check_declared_room(self, request: Request) -> None:
        """:meth:`check_room` before reading the body: one turn and the declared ``Content-Length``."""
        declared = request.headers.get("content-length")
        self.check_room(1, int(declared) if declared is not None and declared.isdigit() else 0)

    async def admit(self, events: list[Event], size: int) -> None:
        """Raise OverloadedError when the request's events may not be accepted now (see the module
        docstring); in Redis mode the transport judges its streams' backlog."""
        self.check_room(len(events), size)
        transport = self.engine.transport
        if transport is not None:
            await transport.admit(events)

    def refuse(self, request: Request, error: OverloadedError) -> Response:
        """The 503 telling the sender to retry; counted, and logged at most once per interval."""
        self.stats.refused[error.reason] = self.stats.refused.get(error.reason, 0) + 1
        self._refusals.log(
            logging.WARNING,
            "ingress: refused %s %s from %s with 503: %s",
            request.method,
            request.url.path,
            _peer(request),
            error,
        )
        return JSONResponse({"error": str(error)}, 503, headers={"Retry-After": str(error.retry_after)})

    def hold(self, task: asyncio.Future[Any], size: int) -> None:
        """Keep ``task`` (turns or a send, shielded from the request) and its request's bytes
        counted as queued until it is done."""
        self.stats.queued_bytes += size
        self._turns.add(task)

        def done(task: asyncio.Future[Any]) -> None:
            self._turns.discard(task)
            self.stats.queued_bytes -= size

        task.add_done_callback(done)

    # -- decoding --------------------------------------------------------------------------------
    async def decode(self, request: Request) -> list[Event]:
        """Every event of the request, all validated, or a 400 naming the first problem."""
        media_type = _media_type(request)
        body = await self.read_body(request)
        try:
            if media_type == STRUCTURED_CONTENT_TYPE:
                return [self.structured(_parse_json(body))]
            if media_type == BATCH_CONTENT_TYPE:
                return self.batch(_parse_json(body, self.max_bytes, 2), len(body) > MAX_EVENT_BYTES)
            if any(name.startswith("ce-") for name in request.headers):
                return [self.binary(request, body)]
        except _Rejected:
            raise
        except Exception as exc:  # not foreseen: still the request's fault, never a 500
            detail = _clause(str(exc))[:200]
            raise _Rejected(
                400, f"The request could not be decoded as a CloudEvent ({type(exc).__name__}: {detail})."
            ) from None
        shown = request.headers.get("content-type")
        raise _Rejected(
            400,
            f"The request is not a CloudEvent (content type {shown!r}); send binary mode with ce-* headers, "
            f"{STRUCTURED_CONTENT_TYPE!r} or {BATCH_CONTENT_TYPE!r}.",
        )

    @staticmethod
    def structured(obj: Any) -> Event:
        try:
            return event_from_dict(obj)
        except EventFormatError as exc:
            raise _Rejected(400, str(exc)) from None

    @staticmethod
    def batch(items: Any, large: bool = False) -> list[Event]:
        """The events of a batch; ``large``: the body is over an event's size limit, so each event's
        own size is checked (as JSON, the form a stream entry holds it in)."""
        if not isinstance(items, list):
            raise _Rejected(400, f"A batch must be a JSON array of CloudEvents, not {type(items).__name__}.")
        if not items:
            raise _Rejected(400, "The batch is empty; send at least one CloudEvent.")
        events = []
        for index, item in enumerate(items):
            try:
                if large:
                    load_json(json.dumps(item, ensure_ascii=False, separators=(",", ":")), "The event")
                events.append(event_from_dict(item))
            except EventFormatError as exc:
                raise _Rejected(
                    400, f"Event {index} of the batch (counting from 0) is invalid: {_lower_first(str(exc))}"
                ) from None
        return events

    @staticmethod
    def binary(request: Request, body: bytes) -> Event:
        for attribute in _BINARY_REQUIRED:
            if f"ce-{attribute}" not in request.headers:
                why = (
                    "krules routes every event to a subject"
                    if attribute == "subject"
                    else "CloudEvents 1.0 requires it"
                )
                raise _Rejected(400, f"The binary-mode request has no 'ce-{attribute}' header; {why}.")
        specversion = request.headers["ce-specversion"]
        if specversion != "1.0":
            raise _Rejected(
                400, f"The event's specversion is {specversion!r}; krules accepts CloudEvents '1.0'."
            )
        content_type = request.headers.get("content-type")
        if body and (content_type is None or "json" in content_type):
            try:
                load_json(body, "The request body", envelopes=0)  # the SDK's parser is not strict
            except EventFormatError as exc:
                raise _Rejected(400, str(exc)) from None
        message = HTTPMessage(headers=_binary_headers(request), body=body)
        try:
            return event_from_cloudevent(from_binary(message, _JSON_FORMAT))
        except EventFormatError as exc:
            raise _Rejected(400, str(exc)) from None
        except BaseCloudEventException as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _Rejected(400, f"The request is not a valid CloudEvent: {_clause(detail)}.") from None
        except (ValueError, OverflowError) as exc:  # e.g. an unparseable ce-time
            raise _Rejected(
                400, f"The request's ce-* headers are not a valid CloudEvent: {_clause(str(exc))}."
            ) from None

    # -- processing ------------------------------------------------------------------------------
    async def process(self, events: list[Event], size: int = 0) -> list[Turn | BaseException]:
        """Run every event as a turn (concurrently) and wait for all of them, even if cancelled."""
        self._starting += len(events)
        runs: list[Awaitable[Turn]] = [self._start(event) for event in events]
        task: asyncio.Future[list[Turn | BaseException]] = asyncio.gather(*runs, return_exceptions=True)
        self.hold(task, size)
        return await asyncio.shield(task)

    def abandon(self) -> None:
        """The server gave up waiting (shutdown deadline): cancel the turns and sends still held; their
        requests are answered 503."""
        self._abandoned = True
        for task in list(self._turns):
            task.cancel()

    def abandoned(self, request: Request, events: list[Event]) -> Response:
        """The 503 for a request whose events a shutdown abandoned (logged at most once per interval)."""
        if self.engine.transport is not None:
            reason = (
                f"This krules instance stopped before the {len(events)} event(s) of the request were surely "
                "queued; retry the request (a partition drops an event id it has processed)."
            )
        else:
            reason = (
                f"This krules instance stopped before the {len(events)} event(s) of the request were "
                "processed (a turn cut short stores none of its cached writes); retry the request."
            )
        self._refusals.log(
            logging.WARNING,
            "ingress: answered %s from %s with 503: %s",
            request.url.path,
            _peer(request),
            reason,
        )
        return JSONResponse(
            {"error": reason, "ids": [], "failed": [event.id for event in events]},
            503,
            headers={"Retry-After": "1", "Connection": "close"},
        )

    async def _start(self, event: Event) -> Turn:
        self._starting -= 1  # from here on the engine counts the turn (engine.queued)
        return await self.engine.process(event)

    # -- endpoints -------------------------------------------------------------------------------
    async def receive(self, request: Request) -> Response:
        try:
            self.authorize(request)
            self.check_declared_room(request)
            events = await self.decode(request)
            _refuse_reserved(events)
            size: int = request.scope.get(_BODY_BYTES, 0)
            await self.admit(events, size)
        except _Rejected as rejected:
            return _reject(request, rejected)
        except OverloadedError as overloaded:
            return self.refuse(request, overloaded)
        except ClientDisconnect:
            logger.warning("ingress: client %s disconnected before sending the whole body", _peer(request))
            return Response(status_code=400)
        try:
            if self.engine.transport is not None:
                return await self.enqueue(request, events, size)
            outcomes = await self.process(events, size)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._abandoned and current is not None and not current.cancelling():
                return self.abandoned(request, events)
            raise
        accepted: list[str] = []
        storage_failures: list[tuple[Event, StorageError]] = []
        other_failures: list[tuple[Event, BaseException]] = []
        for event, outcome in zip(events, outcomes, strict=True):
            if isinstance(outcome, Turn):
                accepted.append(event.id)
            elif isinstance(outcome, StorageError):
                storage_failures.append((event, outcome))
            else:
                other_failures.append((event, outcome))
        for event, error in other_failures:
            logger.error(
                "ingress: event %s (%s for %r) stopped with an unexpected error",
                event.id,
                event.type,
                event.subject,
                exc_info=error,
            )
        if other_failures:
            event, _ = other_failures[0]
            return _reject(
                request,
                _Rejected(
                    500,
                    f"An internal error stopped event {event.id!r} (see this instance's log); "
                    "it may be partly processed.",
                ),
                {"ids": accepted, "failed": [e.id for e, _ in [*other_failures, *storage_failures]]},
            )
        if storage_failures:
            event, error = storage_failures[0]
            failed = [e.id for e, _ in storage_failures]
            if len(events) == 1:
                reason = (
                    f"Event {event.id!r} was not accepted because the subject storage failed "
                    f"({_clause(str(error))}); nothing of it was stored and it is not lost: "
                    "retry the request."
                )
            else:
                reason = (
                    f"The subject storage failed for {len(failed)} of {len(events)} events "
                    f"({_clause(str(error))}); nothing of them was stored and they are not lost: "
                    "retry the events listed in 'failed'."
                )
            return _reject(
                request, _Rejected(503, reason, {"Retry-After": "1"}), {"ids": accepted, "failed": failed}
            )
        logger.debug("ingress: accepted %d event(s) from %s", len(accepted), _peer(request))
        return JSONResponse({"accepted": len(accepted), "ids": accepted})

    async def enqueue(self, request: Request, events: list[Event], size: int = 0) -> Response:
        """Redis mode: append the events to their partitions' streams (shielded from a cancelled request)."""
        transport = self.engine.transport
        if transport is None:
            raise RuntimeError("enqueue needs an engine with a transport")
        task = asyncio.ensure_future(transport.send(events))
        self.hold(task, size)
        try:
            await asyncio.shield(task)
        except EventFormatError as exc:  # an event its stream entry cannot hold (e.g. too large)
            return _reject(request, _Rejected(400, str(exc)), {"ids": [], "failed": [e.id for e in events]})
        except ConfigurationError as exc:  # e.g. a cluster node's URL given for the cluster: no retry helps
            logger.error("ingress: cannot queue events: %s", exc)
            return _reject(
                request,
                _Rejected(500, f"The event(s) could not be queued and a retry will not help: {exc}"),
                {"ids": [], "failed": [event.id for event in events]},
            )
        except StorageError as exc:
            ids = [event.id for event in events]
            return _reject(
                request,
                _Rejected(
                    503,
                    f"The event(s) could not be queued ({_clause(str(exc))}); nothing was queued for sure, "
                    "so retry the same request (a partition drops an event id it has processed).",
                    {"Retry-After": "1"},
                ),
                {"ids": [], "failed": ids},
            )
        logger.debug("ingress: queued %d event(s) from %s", len(events), _peer(request))
        return JSONResponse({"accepted": len(events), "ids": [e.id for e in events], "queued": True}, 202)

    async def subject(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except _Rejected as rejected:
            return _reject(request, rejected)
        name: str = request.path_params["name"]
        try:
            props, ext = await self.engine.storage.load(name)
        except StorageError as exc:
            return _reject(
                request,
                _Rejected(503, f"Cannot read subject {name!r}: {_clause(str(exc))}.", {"Retry-After": "1"}),
            )
        if not props and not ext:
            return JSONResponse({"error": f"Subject {name!r} is not stored on this krules instance."}, 404)
        return JSONResponse({"name": name, "properties": props, "ext": ext})

    async def healthz(self, request: Request) -> Response:
        """``ok``, unless the transport reports a failure (its ``failing`` sentence: e.g. partitions
        that cannot be read), which is answered 503 with that reason."""
        failing = getattr(self.engine.transport, "failing", None)
        if failing:
            return JSONResponse({"status": "failing", "reason": failing}, 503)
        return JSONResponse({"status": "ok"})


def _refuse_reserved(events: list[Event]) -> None:
    """400 for an event carrying a ``krules*`` extension: those steer the engine (a replay, the
    cascade depth), so only the engine sets them, never a sender."""
    for index, event in enumerate(events):
        name = reserved_attribute(event)
        if name is not None:
            which = "The event" if len(events) == 1 else f"Event {index} of the batch (counting from 0)"
            raise _Rejected(
                400,
                f"{which} carries the extension {name!r}; extensions named {RESERVED_PREFIX}* are the "
                "krules engine's own and are not accepted from senders.",
            )


def _parse_json(body: bytes, max_bytes: int = MAX_EVENT_BYTES, envelopes: int = 1) -> Any:
    try:
        return load_json(body, "The request body", max_bytes=max_bytes, envelopes=envelopes)
    except EventFormatError as exc:
        raise _Rejected(400, str(exc)) from None


def _binary_headers(request: Request) -> dict[str, str]:
    """The request's headers, with the ``ce-*`` values as UTF-8 text, strictly: the SDK would read
    raw bytes as Latin-1 and replace percent-encoded bytes that are not UTF-8."""
    headers = dict(request.headers)
    for name, value in headers.items():
        if name.startswith("ce-") and not value.isascii():
            try:
                headers[name] = value.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                raise _Rejected(
                    400, f"The {name!r} header is not UTF-8 ({shown_value(value)} as Latin-1); send UTF-8."
                ) from None
        if name.startswith("ce-") and "%" in value:
            try:
                unquote(headers[name], errors="strict")
            except UnicodeDecodeError:
                raise _Rejected(
                    400, f"The {name!r} header {shown_value(value)} percent-encodes bytes that are not UTF-8."
                ) from None
    return headers


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client is not None else "?"


def _reject(request: Request, rejected: _Rejected, extra: dict[str, Any] | None = None) -> Response:
    reason = rejected.reason
    if not reason.isascii():  # a lone surrogate quoted from the request could not be sent or logged
        reason = reason.encode("utf-8", "backslashreplace").decode()
    logger.warning(
        "ingress: rejected %s %s from %s with %d: %s",
        request.method,
        request.url.path,
        _peer(request),
        rejected.status,
        reason,
        extra={"status": rejected.status, "reason": reason},
    )
    content: dict[str, Any] = {"error": reason}
    if extra:
        content.update(extra)
    return JSONResponse(content, rejected.status, headers=rejected.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        reason = f"There is no {request.url.path!r} on this krules instance; events go to POST /events."
    elif status == 405:
        reason = f"The path {request.url.path!r} does not accept {request.method} requests."
    else:
        reason = f"The request failed with HTTP status {status}."
    headers = exc.headers if isinstance(exc, HTTPException) else None
    return _reject(request, _Rejected(status, reason, dict(headers) if headers else None))


class _Authorized(BaseRoute):
    """``route``, served only to requests with the ingress token (when one is set)."""

    def __init__(self, route: BaseRoute, ingress: _Ingress) -> None:
        self.route = route
        self.ingress = ingress

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return self.route.matches(scope)

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        return self.route.url_path_for(name, **path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.ingress.token is not None and scope["type"] == "http":
            request = Request(scope, receive)
            try:
                self.ingress.authorize(request)
            except _Rejected as rejected:
                await _reject(request, rejected)(scope, receive, send)
                return
        await self.route.handle(scope, receive, send)


def create_ingress_app(
    engine: Engine, *, routes: Sequence[BaseRoute] = (), stats: ServerStats | None = None
) -> Starlette:
    """The Starlette app that feeds ``engine`` from HTTP; ``routes`` are added after the built-in
    ones, behind the ingress token like them (when one is set).

    ``stats`` is where it counts what it refuses (``app.state.stats``; a new one by default)."""
    stats = stats if stats is not None else ServerStats()
    ingress = _Ingress(engine, stats)
    app = Starlette(
        routes=[
            Route("/", ingress.receive, methods=["POST"]),
            Route("/events", ingress.receive, methods=["POST"]),
            Route("/healthz", ingress.healthz, methods=["GET"]),
            Route("/subjects/{name:path}", ingress.subject, methods=["GET"]),
            *(_Authorized(route, ingress) for route in [*dead_letter_routes(engine), *routes]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.engine = engine
    app.state.stats = stats
    app.state.abandon = ingress.abandon
    return app
