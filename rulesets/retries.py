"""Calling an external API with retries and exponential backoff.

``api.call`` asks for one request to an external API; its payload is the request (for the default
HTTP client: ``{"url": ..., "method": "GET" | "POST", "json": {...}}``).  The subject names the API
call (e.g. ``weather-api``) and keeps its state:

- ``retry_count``: retries made so far for the current request.  Written **muted**: it is
  bookkeeping, and an event per retry would only wake handlers for nothing.
- ``last_success``: ISO time of the last successful call (a real change: others may react to it).

On failure the handler sleeps ``BACKOFF_BASE ** retry`` seconds (2, 4, 8, ...) on the engine's
clock (``ctx.clock.sleep``: tests fake it, nobody blocks the event loop) and emits ``api.call``
again with the same request, up to ``MAX_RETRIES`` retries; then it emits ``api.call_failed``.
Either way the count goes back to 0, so the next ``api.call`` starts afresh (in the KRules snippet
this is adapted from, a subject that once gave up kept ``retry_count`` at the limit and ignored
every later call; its retries also lost the request).  An error retrying cannot fix (``PermanentApiError``,
e.g. a 404 or a request without a url) fails at once.

The retries run inside the turn of the first ``api.call``: later events for the same subject wait
until it succeeded or gave up (events of other subjects do not); each retry is one level deeper in
the cascade, so ``MAX_RETRIES`` must stay well below the loop guard's depth limit (32).

Handles: ``api.call``.  Emits: ``api.call`` (a retry, same payload), ``api.call_succeeded``
``{"response", "retries"}``, ``api.call_failed`` ``{"error", "retries", "request"}``.

The client is pluggable: ``api_client`` is any object with ``async def call(request) -> dict``;
replace it (``rulesets.retries.api_client = MyClient()``) to call something other than HTTP, or in
tests.

Try it::

    krules run rulesets.retries
    krules emit api.call weather-api --data '{"url": "https://httpbin.org/get"}'
    krules emit api.call flaky-api --data '{"url": "https://httpbin.org/status/503"}'   # 3 retries
    krules subject show weather-api
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from krules import EventContext, on

logger = logging.getLogger(__name__)

MAX_RETRIES = 3
"""Retries after the first attempt before ``api.call_failed`` (so at most 4 attempts)."""

BACKOFF_BASE = 2
"""Retry ``n`` waits ``BACKOFF_BASE ** n`` seconds."""

_RETRYABLE_STATUS = frozenset({408, 425, 429})


class PermanentApiError(Exception):
    """Raised by an API client for a failure that retrying cannot fix (a bad request, a 404)."""


class ApiClient(Protocol):
    """What ``call_api`` needs: send one request, return the response as a JSON-able dict, or raise."""

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send ``request``; raise on failure (``PermanentApiError`` when a retry cannot help)."""
        ...


class HttpApiClient:
    """The default client: ``GET`` (or ``POST`` with ``request["json"]``) to ``request["url"]`` with httpx.

    Server errors (5xx), timeouts, connection errors and 408/425/429 are worth retrying; any other
    4xx and a malformed request raise ``PermanentApiError``.
    """

    def __init__(self, timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.timeout = timeout
        self.transport = transport

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        url = request.get("url")
        if not isinstance(url, str) or not url:
            raise PermanentApiError(f"An api.call request needs a 'url' string, not {url!r}.")
        method = str(request.get("method", "GET")).upper()
        if method not in {"GET", "POST"}:
            raise PermanentApiError(f"An api.call request's method must be GET or POST, not {method!r}.")
        async with httpx.AsyncClient(timeout=self.timeout, transport=self.transport) as client:
            try:
                response = await client.request(
                    method, url, json=request.get("json") if method == "POST" else None
                )
            except httpx.UnsupportedProtocol as exc:
                raise PermanentApiError(f"Cannot call {url!r}: {exc}.") from exc
        if response.is_client_error and response.status_code not in _RETRYABLE_STATUS:
            raise PermanentApiError(
                f"{method} {url} answered {response.status_code} {response.reason_phrase}."
            )
        response.raise_for_status()
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        return {"status": response.status_code, "body": body}


api_client: ApiClient = HttpApiClient()
"""The client ``call_api`` uses; replace it to call something else."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@on("api.call")
async def call_api(ctx: EventContext) -> None:
    """Call the API; on failure back off and retry, up to ``MAX_RETRIES`` times."""
    api = ctx.subject
    retries = await api.get("retry_count", default=0)
    try:
        response = await api_client.call(ctx.payload)
    except Exception as exc:
        if retries < MAX_RETRIES and not isinstance(exc, PermanentApiError):
            retries += 1
            await api.set("retry_count", retries, muted=True)
            delay = BACKOFF_BASE**retries
            logger.warning("call %r failed (%s); retry %d in %ss", api.name, _describe(exc), retries, delay)
            await ctx.clock.sleep(delay)
            await ctx.emit("api.call", ctx.payload)
        else:
            await api.set("retry_count", 0, muted=True)
            await ctx.emit(
                "api.call_failed", {"error": _describe(exc), "retries": retries, "request": ctx.payload}
            )
        return
    await api.set("retry_count", 0, muted=True)
    await api.set("last_success", datetime.fromtimestamp(ctx.clock.now(), UTC).isoformat())
    await ctx.emit("api.call_succeeded", {"response": response, "retries": retries})
