"""Connection limits of the HTTP server: a cap on open connections, deadlines for a request's headers
and for an idle kept-alive connection, and failed accepts logged once per interval.

uvicorn bounds the size of a request's headers (h11: :data:`MAX_HEADER_BYTES`) but not how long they
may take, nor how many connections are open: idle or half-sent connections piled up until the
process ran out of file descriptors, and asyncio then logged a traceback per failed ``accept()``
(thousands a second).  :class:`ConnectionGuard` adds what is missing around uvicorn's h11 protocol:

* **a cap** (``KRULES_HTTP_MAX_CONNECTIONS``): a connection arriving while that many are open is
  answered ``503`` with ``Retry-After`` and closed at once (its socket lingers at most
  :data:`LINGER_SECONDS` so the client can read the answer; past :data:`MAX_LINGERING` such
  sockets, it is closed without one), so file descriptors stay bounded.  uvicorn's own
  ``limit_concurrency`` is not used: it keeps the connection and refuses requests on connections
  already open as well.
* **a header deadline** (``KRULES_HTTP_HEADER_TIMEOUT``): from a connection's opening, or from the
  first byte of a later request on a kept-alive one, its request line and headers must be in within
  it; a connection that sends nothing is closed after it too.
* **an idle deadline** (``KRULES_HTTP_IDLE_TIMEOUT``): a kept-alive connection with no new request
  for that long is closed (uvicorn's ``timeout_keep_alive`` is set a second later, as a fallback).
* **failed accepts** (out of file descriptors, whatever holds them): counted and logged once per
  :data:`ACCEPT_ERROR_LOG_SECONDS` by the event loop's exception handler, not once per attempt.

The body's deadline (``KRULES_HTTP_BODY_TIMEOUT``) is the ingress's (:mod:`krules.http.ingress`).
Every closing is counted in :class:`~krules.http.stats.ServerStats`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from uvicorn.protocols.http.h11_impl import H11Protocol

from krules.http.stats import LogEvery, ServerStats

if TYPE_CHECKING:
    from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope

    from krules.config import Settings

__all__ = [
    "ACCEPT_ERROR_LOG_SECONDS",
    "LINGER_SECONDS",
    "MAX_HEADER_BYTES",
    "MAX_LINGERING",
    "ConnectionGuard",
]

logger = logging.getLogger("krules.server")

MAX_HEADER_BYTES: Final = 16 * 1024
"""Largest request line plus headers; more is a 400 and the connection is closed (h11's bound)."""

LINGER_SECONDS: Final = 1.0
"""How long a refused connection stays open for its client to read the 503."""

MAX_LINGERING: Final = 64
"""Refused connections kept lingering at most; beyond, a refused connection is closed at once."""

ACCEPT_ERROR_LOG_SECONDS: Final = 10.0
"""At most one log line per this many seconds about connections that could not be accepted."""

_RESOURCE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


def _refusal(cap: int) -> bytes:
    body = json.dumps(
        {
            "error": f"This krules instance has {cap} connections open (KRULES_HTTP_MAX_CONNECTIONS); "
            "retry after the time in Retry-After."
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class ConnectionGuard:
    """The connection limits of one server (see the module docstring), counting into ``stats``."""

    def __init__(self, settings: Settings, stats: ServerStats) -> None:
        self.max_connections = settings.http_max_connections
        self.header_timeout = settings.http_header_timeout
        self.idle_timeout = settings.http_idle_timeout
        self.stats = stats
        self.lingering = 0
        self._refusal = _refusal(self.max_connections)
        self._accept_errors = LogEvery(logger, ACCEPT_ERROR_LOG_SECONDS)

    def protocol(self) -> type[asyncio.Protocol]:
        """uvicorn's h11 protocol with these limits (what ``uvicorn.Config(http=...)`` takes)."""
        guard = self

        class GuardedH11Protocol(H11Protocol):
            _deadline: asyncio.TimerHandle | None = None
            _deadline_kind: str | None = None
            _counted = False

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                app = self.app

                async def serve(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
                    self._disarm()  # a request is here: its headers are in
                    try:
                        await app(scope, receive, send)
                    finally:
                        if not self.transport.is_closing():
                            self._arm("idle", guard.idle_timeout)

                self.app = serve

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if guard.stats.connections >= guard.max_connections:
                    guard.refuse(transport)
                    return
                self._counted = True
                guard.stats.connections += 1
                super().connection_made(transport)  # type: ignore[arg-type]
                self._arm("header", guard.header_timeout)

            def data_received(self, data: bytes) -> None:
                if self._deadline_kind == "idle":  # a new request begins: its headers have a deadline
                    self._arm("header", guard.header_timeout)
                super().data_received(data)

            def connection_lost(self, exc: Exception | None) -> None:
                if self._counted:
                    self._counted = False
                    guard.stats.connections -= 1
                self._disarm()
                super().connection_lost(exc)

            def _arm(self, kind: str, seconds: float) -> None:
                self._disarm()
                self._deadline_kind = kind
                self._deadline = self.loop.call_later(seconds, self._expired, kind)

            def _disarm(self) -> None:
                if self._deadline is not None:
                    self._deadline.cancel()
                self._deadline = self._deadline_kind = None

            def _expired(self, kind: str) -> None:
                self._deadline = self._deadline_kind = None
                if not self.transport.is_closing():
                    guard.stats.timeouts[kind] += 1
                    self.transport.close()

        return GuardedH11Protocol

    def refuse(self, transport: asyncio.BaseTransport) -> None:
        """Answer a connection over the cap with a 503 and close it (see the module docstring)."""
        self.stats.connections_refused += 1
        refusal = _Refusal(self)
        transport.set_protocol(refusal)
        refusal.connection_made(transport)

    def exception_handler(self, previous: ExceptionHandler | None) -> ExceptionHandler:
        """An event-loop exception handler that counts failed accepts and logs them once per
        interval, handing everything else to ``previous`` (or the loop's default handler)."""

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            error = context.get("exception")
            if "socket" in context and isinstance(error, OSError) and error.errno in _RESOURCE_ERRORS:
                self.stats.accept_errors += 1
                self._accept_errors.log(
                    logging.ERROR,
                    "cannot accept connections (%s) with %d open (KRULES_HTTP_MAX_CONNECTIONS=%d); lower "
                    "that, or raise this process's file descriptor limit (ulimit -n)",
                    error.strerror or error,
                    self.stats.connections,
                    self.max_connections,
                )
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        return handle

    def check_descriptor_limit(self) -> None:
        """Warn when the process's file descriptor limit is below the connection cap plus a margin
        (the cap would not keep accepts from failing)."""
        try:
            import resource
        except ImportError:  # not on this platform
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = self.max_connections + MAX_LINGERING + 64
        if soft != resource.RLIM_INFINITY and soft < needed:
            logger.warning(
                "this process may open %d files, less than KRULES_HTTP_MAX_CONNECTIONS=%d needs (%d with "
                "a margin); lower it, or raise the limit (ulimit -n)",
                soft,
                self.max_connections,
                needed,
            )


class _Refusal(asyncio.Protocol):
    """A connection over the cap: a 503 written, the write side shut, kept until the client closes or
    :data:`LINGER_SECONDS` pass (closing with the client's request unread could reset the connection
    before the client reads the answer)."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.timer: asyncio.TimerHandle | None = None
        self.lingers = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            transport.close()
            return
        transport.write(self.guard._refusal)
        if self.guard.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        self.lingers = True
        self.guard.lingering += 1
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        """The request is not read: it is refused."""

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.lingers:
            self.lingers = False
            self.guard.lingering -= 1
