"""Serving the ingress with uvicorn: start the engine, serve, shut down within a deadline, close the engine.

:class:`KRulesServer` binds its socket itself (so a busy port is one clear :class:`ServerError`, and
port 0 picks a free port whose number is known before serving), checks the storage with
``engine.start()``, serves until told to stop, then stops accepting and lets in-flight requests and
turns finish — for at most ``KRULES_SHUTDOWN_TIMEOUT`` seconds from the stop.  What is not done by
then is abandoned: the requests still waiting are answered 503 (retry), the turns cancelled and
counted in one log line (embedded mode loses them, as on a crash; in Redis mode their entries stay
pending and are taken again).  :meth:`KRulesServer.stop_now` abandons at once.  :func:`run` is the
blocking entry point of ``krules run``: SIGTERM or SIGINT stops it gracefully, a second one stops it
now; it returns how many turns were abandoned (0 for a clean stop, which exits 0).

For tests and embedding there are two helpers: :func:`serve_in_background` (an async context
manager running the server as a task of the current loop) and :class:`ServerThread` (a server on
its own thread and loop, for synchronous code).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import FrameType, TracebackType
from typing import Any, Final

import uvicorn
from prometheus_client import CollectorRegistry
from starlette.routing import BaseRoute

from krules.engine import Engine
from krules.errors import ServerError
from krules.http.client import default_url
from krules.http.connections import MAX_HEADER_BYTES, ConnectionGuard
from krules.http.ingress import create_ingress_app
from krules.http.stats import ServerCollector, ServerStats

__all__ = ["KRulesServer", "ServerThread", "bind_socket", "run", "serve_in_background"]

logger = logging.getLogger("krules.server")  # its name before the re-layout, kept for logging configs

GRACEFUL_SHUTDOWN_SECONDS: Final = 30
"""``KRULES_SHUTDOWN_TIMEOUT``'s default: how long in-flight requests and turns may take once a stop is
asked for (then they are abandoned)."""

_POLL_SECONDS: Final = 0.01
_ABANDON_GRACE: Final = 1.0  # how long abandoned work may take to unwind (answer 503, unregister)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its signal handlers: krules takes SIGTERM/SIGINT itself (a second one
    stops at once), so uvicorn must neither take them nor raise them again once it is done."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 picks a free port), or a ServerError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(
            f"Cannot listen on host {host!r} ({exc.strerror}); check KRULES_HTTP_HOST."
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServerError(
                f"Cannot listen on {host}:{port} because the address is already in use; stop the other "
                "process or choose another KRULES_HTTP_PORT."
            ) from None
        raise ServerError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    sock.setblocking(False)
    return sock


class KRulesServer:
    """The ingress of one engine served by uvicorn on ``host:port`` (defaults from the engine's settings)."""

    def __init__(
        self,
        engine: Engine,
        host: str | None = None,
        port: int | None = None,
        *,
        routes: Sequence[BaseRoute] = (),
        graceful_timeout: float | None = None,
        access_log: bool = False,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        """``graceful_timeout``: the shutdown deadline in seconds (default ``KRULES_SHUTDOWN_TIMEOUT``);
        ``metrics_registry``: where to export what the server bounds (:mod:`krules.http.stats`)."""
        self.engine = engine
        self.shutdown_timeout = (
            graceful_timeout if graceful_timeout is not None else engine.settings.shutdown_timeout
        )
        self.host = host if host is not None else engine.settings.http_host
        self.port = port if port is not None else engine.settings.http_port
        self.stats = ServerStats()
        """What the server refused and closed (exported to ``metrics_registry``, if given)."""
        if metrics_registry is not None:
            metrics_registry.register(ServerCollector(self.stats, engine))
        self.guard = ConnectionGuard(engine.settings, self.stats)
        self.app = create_ingress_app(engine, routes=routes, stats=self.stats)
        self._config = uvicorn.Config(
            self.app,
            http=self.guard.protocol(),  # h11 with a connection cap and header/idle deadlines
            log_config=None,  # the process's logging configuration applies (see krules.cli)
            lifespan="off",  # the engine's lifecycle is ours, so its errors are ours to report
            access_log=access_log,
            server_header=False,
            timeout_graceful_shutdown=None,  # the deadline is ours: see _enforce_deadline
            timeout_keep_alive=math.ceil(engine.settings.http_idle_timeout) + 1,  # the guard's is first
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )
        self._uvicorn = _Uvicorn(self._config)
        self._stop_requested = False
        self._stop_at: float | None = None  # time.monotonic() of the first stop
        self._now = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None  # set (on the loop) when a stop is asked for
        self._abandoned: asyncio.Event | None = None
        self._companion_error: Exception | None = None
        self.abandoned = 0
        """Turns abandoned at the shutdown deadline (or by :meth:`stop_now`); 0 after a clean stop."""

    @property
    def url(self) -> str:
        """Where clients reach the server (a wildcard host is reached on loopback)."""
        return default_url(self.host, self.port)

    @property
    def started(self) -> bool:
        """True once uvicorn serves requests."""
        return self._uvicorn.started

    def bind(self) -> socket.socket:
        """Bind the listening socket now; with port 0, ``self.port`` becomes the port picked."""
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        return sock

    async def serve(
        self, sock: socket.socket | None = None, on_started: Callable[[], Any] | None = None
    ) -> None:
        """Start the engine, serve until :meth:`stop`, then shut down within the deadline (see the
        module docstring) and close the engine.

        Raises ServerError when the address cannot be bound and StorageError when the storage is
        unreachable.  ``on_started()`` is called once requests are being served; if it returns a
        coroutine, that runs alongside the server and is cancelled when serving ends, before the
        engine closes (so the engine's last turns are not joined by new ones).  If that coroutine
        fails (e.g. the partition worker cannot go on), the server stops and its error is raised.
        """
        if sock is None:
            sock = self.bind()
        try:
            await self.engine.start()
        except BaseException:
            sock.close()
            raise
        self.guard.check_descriptor_limit()
        loop = self._loop = asyncio.get_running_loop()
        previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self.guard.exception_handler(previous_handler))
        self._changed, self._abandoned = asyncio.Event(), asyncio.Event()
        if self._stop_requested:
            self._changed.set()
        deadline = asyncio.ensure_future(self._enforce_deadline())
        companions: list[asyncio.Future[Any]] = []
        try:
            if self._stop_requested:
                self._uvicorn.should_exit = True
            if on_started is not None:
                companions.append(asyncio.ensure_future(self._notify_started(on_started, companions)))
            logger.debug("krules ingress starting on %s", self.url)
            await self._uvicorn.serve(sockets=[sock])
        finally:
            self.stop()  # whatever ended serving, what follows is a shutdown, with its deadline
            try:
                await self._wind_down(companions)
            finally:
                deadline.cancel()
                await asyncio.gather(deadline, return_exceptions=True)
                sock.close()
                await self.engine.close(wait=not self._abandoned.is_set())
                loop.set_exception_handler(previous_handler)
                self._loop = None
                logger.info("krules ingress on %s stopped", self.url)
        if self._companion_error is not None:
            raise self._companion_error

    async def _wind_down(self, companions: list[asyncio.Future[Any]]) -> None:
        """Stop the companions (the partition worker stops reading) and wait for the engine's turns,
        until they are done or abandoned."""
        for task in companions:
            task.cancel()

        async def finish() -> None:
            await asyncio.gather(*companions, return_exceptions=True)
            await self.engine.settled()

        work = asyncio.ensure_future(finish())
        abandoned = self._abandoned
        if abandoned is None:
            raise RuntimeError("the server winds down only while serving")
        gave_up = asyncio.ensure_future(abandoned.wait())
        await asyncio.wait({work, gave_up}, return_when=asyncio.FIRST_COMPLETED)
        gave_up.cancel()
        if not work.done():  # abandoned: the worker cancels its turns (their entries stay pending)
            work.cancel()
            await asyncio.wait({work}, timeout=_ABANDON_GRACE)

    async def _enforce_deadline(self) -> None:
        """Once a stop is asked for, wait for the shutdown deadline (or :meth:`stop_now`), then abandon
        what is still in flight."""
        changed = self._changed
        if changed is None:
            raise RuntimeError("the deadline is enforced only while serving")
        await changed.wait()
        engine = self.engine
        logger.info(
            "krules stopping: no new connections; the requests and the %d turn(s) in flight get up to %g s "
            "(KRULES_SHUTDOWN_TIMEOUT); stop again to stop now",
            engine.inflight,
            self.shutdown_timeout,
        )
        while not self._now:
            started = self._stop_at if self._stop_at is not None else time.monotonic()
            remaining = started + self.shutdown_timeout - time.monotonic()
            if remaining <= 0:
                break
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        if not engine.inflight and not self._uvicorn.server_state.tasks:
            self._uvicorn.force_exit = True
            return
        self._abandon()

    def _abandon(self) -> None:
        """Give up on what is in flight: count and log the turns, answer waiting requests 503."""
        engine = self.engine
        self.abandoned = engine.inflight
        why = (
            "on a second stop"
            if self._now
            else f"at the shutdown deadline ({self.shutdown_timeout:g} s, KRULES_SHUTDOWN_TIMEOUT)"
        )
        if engine.transport is None:
            fate = "they are lost (embedded mode is at-most-once; their senders are answered 503)"
        else:
            fate = "their stream entries stay pending and are taken again by the partitions' next owner"
        if self.abandoned:
            logger.error(
                "krules stopped %s with %d turn(s) not finished (%d of them not started); %s",
                why,
                self.abandoned,
                engine.queued,
                fate,
            )
        abandon_requests: Callable[[], None] | None = getattr(self.app.state, "abandon", None)
        if abandon_requests is not None:
            abandon_requests()
        self._uvicorn.force_exit = True
        if self._abandoned is not None:
            self._abandoned.set()

    async def _notify_started(
        self, on_started: Callable[[], Any], companions: list[asyncio.Future[Any]]
    ) -> None:
        # uvicorn has no start-up hook without a lifespan, so watch its flag (the socket already
        # listens, so connections made meanwhile just wait in the backlog).
        while not self._uvicorn.started:
            await asyncio.sleep(_POLL_SECONDS)
        result = on_started()
        if asyncio.iscoroutine(result):
            task = asyncio.ensure_future(result)
            task.add_done_callback(self._companion_done)
            companions.append(task)

    def _companion_done(self, task: asyncio.Future[Any]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        logger.error("a task started with the server failed; stopping", exc_info=error)
        if isinstance(error, Exception) and self._companion_error is None:
            self._companion_error = error
        self.stop()

    def stop(self) -> None:
        """Ask the server to stop: no new connections; in-flight requests and turns get until the
        shutdown deadline to finish (any thread, or a signal handler, may call it; calling it again
        changes nothing)."""
        self._stop_requested = True
        self._uvicorn.should_exit = True
        if self._stop_at is None:
            self._stop_at = time.monotonic()
            self._wake()

    def stop_now(self) -> None:
        """Stop without waiting for what is in flight (as a second SIGTERM/SIGINT does): it is abandoned."""
        self._now = True
        self._uvicorn.force_exit = True
        self.stop()
        self._wake()

    def _wake(self) -> None:
        loop, changed = self._loop, self._changed
        if loop is not None and changed is not None and not loop.is_closed():
            loop.call_soon_threadsafe(changed.set)


class _SignalsRecorded:
    """Replace SIGTERM/SIGINT handlers with recorders for the duration of serving: the first stops the
    server gracefully, any later one stops it now (uvicorn takes no signal itself, see
    :class:`_Uvicorn`).  A signal arriving before the server serves stops it as soon as it starts."""

    _SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, server: KRulesServer) -> None:
        self.server = server
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            self.server.stop()
        else:
            self.server.stop_now()

    def __enter__(self) -> _SignalsRecorded:
        if threading.current_thread() is threading.main_thread():
            for signum in self._SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run(
    engine: Engine,
    host: str | None = None,
    port: int | None = None,
    *,
    on_started: Callable[[KRulesServer], Any] | None = None,
    routes: Sequence[BaseRoute] = (),
    metrics_registry: CollectorRegistry | None = None,
) -> int:
    """Serve ``engine`` until SIGTERM/SIGINT, then shut down within the deadline and return how many
    turns were abandoned (0: a clean stop) (blocking).  A second signal stops it at once.

    ``on_started(server)`` runs on the event loop once requests are served; a coroutine it
    returns runs alongside until shutdown (see :meth:`KRulesServer.serve`).  ``routes`` are served
    next to the ingress's own (e.g. ``/metrics``), and ``metrics_registry`` gets the server's own
    metrics (:mod:`krules.http.stats`).
    """
    server = KRulesServer(engine, host, port, routes=routes, metrics_registry=metrics_registry)
    sock = server.bind()

    def started() -> Any:
        logger.info("krules ready on %s (SIGTERM or Ctrl+C to stop)", server.url)
        return on_started(server) if on_started is not None else None

    with _SignalsRecorded(server) as signals:
        try:
            asyncio.run(server.serve(sock, on_started=started))
        finally:
            sock.close()
    if signals.received:
        logger.info("krules stopped by %s", ", then ".join(signal.Signals(n).name for n in signals.received))
    return server.abandoned


@contextlib.asynccontextmanager
async def serve_in_background(
    engine: Engine, host: str = "127.0.0.1", port: int = 0, *, routes: Sequence[BaseRoute] = ()
) -> AsyncIterator[KRulesServer]:
    """Serve ``engine`` as a task of the running loop for the block; yields once requests are served.

    The engine is started before and closed after, as by :func:`run`.
    """
    server = KRulesServer(engine, host, port, routes=routes)
    sock = server.bind()
    ready = asyncio.Event()
    task = asyncio.ensure_future(server.serve(sock, on_started=ready.set))
    ready_wait = asyncio.ensure_future(ready.wait())
    try:
        await asyncio.wait({task, ready_wait}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # start-up failed: raise its error
            raise ServerError(f"The krules server on {server.url} stopped before it served a request.")
        yield server
    finally:
        ready_wait.cancel()
        server.stop()
        await asyncio.gather(task, return_exceptions=True)


class ServerThread:
    """Serve an engine on a thread with its own event loop (for synchronous code and tests).

    ``with ServerThread(engine) as server: KRulesClient(server.url).emit(...)``; the engine must
    then be used only through the server (its turns run on the thread's loop).
    """

    def __init__(
        self, engine: Engine, host: str = "127.0.0.1", port: int = 0, *, start_timeout: float = 10.0
    ) -> None:
        self.server = KRulesServer(engine, host, port)
        self._start_timeout = start_timeout
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> ServerThread:
        """Bind, start the thread and return once requests are served (raises the start-up error)."""
        sock = self.server.bind()
        self._thread = threading.Thread(target=self._main, args=(sock,), name="krules-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            self.stop()
            raise ServerError(
                f"The krules server on {self.url} did not start within {self._start_timeout} seconds."
            )
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self

    def _main(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self.server.serve(sock, on_started=self._ready.set))
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop serving gracefully and wait for the thread (by default the shutdown deadline and 5 s
        more); re-raise an error it ended with."""
        self.server.stop()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.server.shutdown_timeout + 5.0)
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
