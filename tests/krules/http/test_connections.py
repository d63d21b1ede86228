"""Connection limits of the server, over real loopback sockets: a cap answered with 503, header, idle
and body deadlines, and failed accepts logged once per interval instead of once per attempt."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from krules.config import Settings
from krules.context import EventContext
from krules.http.server import KRulesServer, serve_in_background
from krules.testing import KRulesTestApp, wait_until

GUARD = 30.0
"""A guard against a hang, not a timing assertion: every deadline under test is a second or less."""


@asynccontextmanager
async def served(**settings: Any) -> AsyncIterator[tuple[KRulesTestApp, KRulesServer]]:
    app = KRulesTestApp(settings=Settings(**settings))

    @app.on("job.run")
    async def run(ctx: EventContext) -> None:
        await ctx.subject.set("done", True)

    async with serve_in_background(app.engine) as server:
        yield app, server


async def connect(server: KRulesServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = urlsplit(server.url)
    assert address.hostname is not None and address.port is not None
    return await asyncio.open_connection(address.hostname, address.port)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    chunks = []
    with suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), GUARD):
            chunks.append(chunk)
    return b"".join(chunks)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers (lower-case names) and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD)
    status_line, *lines = head.decode("latin-1").strip().split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), GUARD)
    return int(status_line.split()[1]), headers, body


def until(condition: Callable[[], bool]) -> Callable[[], Any]:
    async def check() -> bool:
        return condition()

    check.__name__ = getattr(condition, "__name__", "condition")
    return check


async def test_connections_over_the_cap_are_answered_503_with_retry_after_and_closed() -> None:
    async with served(http_max_connections=10, http_header_timeout=120) as (_, server):
        stats = server.stats
        accepted: list[asyncio.StreamWriter] = []
        refused: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for opened in range(1, 201):
            reader, writer = await connect(server)

            async def accounted(opened: int = opened) -> bool:  # accepted or refused, as the server saw it
                return stats.connections + stats.connections_refused == opened

            await wait_until(accounted, GUARD)
            if stats.connections > len(accepted):
                accepted.append(writer)
            else:
                refused.append((reader, writer))

        assert (len(accepted), len(refused)) == (10, 190)
        assert (stats.connections, stats.connections_refused) == (10, 190)
        for reader, writer in refused:
            answer = await read_until_closed(reader)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert re.search(rb"\r\nretry-after: 1\r\n", answer)
            assert b"KRULES_HTTP_MAX_CONNECTIONS" in answer

        accepted.pop().close()  # a slot frees up: the next client gets in
        await wait_until(until(lambda: stats.connections == 9), GUARD)
        async with httpx.AsyncClient(timeout=GUARD) as http:
            assert (await http.get(server.url + "/healthz")).status_code == 200
        for writer in accepted:
            writer.close()


async def test_silent_connections_and_half_sent_headers_are_closed_at_the_header_deadline() -> None:
    async with served(http_header_timeout=0.5) as (_, server):
        silent = [await connect(server) for _ in range(20)]
        trickling = [await connect(server) for _ in range(20)]

        async def trickle(writer: asyncio.StreamWriter) -> None:
            writer.write(b"POST /events HTTP/1.1\r\nhost: krules\r\nx-slow: ")
            with suppress(ConnectionError):
                while not writer.is_closing():  # one byte at a time, never the end of the headers
                    writer.write(b"z")
                    await writer.drain()
                    await asyncio.sleep(0.05)

        trickles = [asyncio.ensure_future(trickle(writer)) for _, writer in trickling]
        answers = await asyncio.gather(*(read_until_closed(reader) for reader, _ in [*silent, *trickling]))

        assert answers == [b""] * 40  # closed without a word
        await wait_until(until(lambda: server.stats.connections == 0), GUARD)
        assert server.stats.timeouts["header"] == 40
        for task in trickles:
            task.cancel()
        for _, writer in [*silent, *trickling]:
            writer.close()
        assert await server.engine.storage.subjects() == []


async def test_a_kept_alive_connection_serves_requests_then_is_closed_at_the_idle_deadline() -> None:
    async with served(http_idle_timeout=0.5) as (_, server):
        reader, writer = await connect(server)
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: krules\r\n\r\n")
            status, _, body = await read_response(reader)
            assert (status, body) == (200, b'{"status":"ok"}')

        assert await read_until_closed(reader) == b""
        assert server.stats.timeouts["idle"] == 1
        writer.close()


async def test_a_body_late_for_its_deadline_is_408_the_connection_closed_and_nothing_processed() -> None:
    async with served(http_body_timeout=0.5) as (app, server):
        reader, writer = await connect(server)
        writer.write(
            b"POST /events HTTP/1.1\r\nhost: krules\r\ncontent-type: application/cloudevents+json\r\n"
            b"content-length: 200\r\n\r\n"
            b'{"specversion": "1.0", "id": "slow-1", '
        )

        answer = await read_until_closed(reader)

        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"KRULES_HTTP_BODY_TIMEOUT" in answer
        assert server.stats.timeouts["body"] == 1
        assert await app.engine.storage.subjects() == []
        writer.close()


# -- out of file descriptors, in a real `krules run` ----------------------------------------------------
RULES = '''
"""Nothing to do: the test is about connections."""
'''


def test_failed_accepts_are_counted_and_logged_once_per_interval_not_per_attempt(tmp_path: Path) -> None:
    rules = tmp_path / "idle_rules.py"
    rules.write_text(RULES)
    log_path = tmp_path / "krules.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRULES_")}
    env.update(PYTHONUNBUFFERED="1", KRULES_HTTP_PORT="0", KRULES_HTTP_HEADER_TIMEOUT="120")

    def few_descriptors() -> None:  # runs in the child: the cap (1000) cannot protect it
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    with log_path.open("wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "krules", "run", str(rules)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            preexec_fn=few_descriptors,
        )
    clients: list[socket.socket] = []
    try:
        port = int(wait_for_log(log_path, r"krules ready on http://127\.0\.0\.1:(\d+)", child).group(1))
        for _ in range(80):  # more than the child has descriptors for
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=GUARD))
        wait_for_log(log_path, r"cannot accept connections", child)
        time.sleep(2.0)  # the failing accepts go on, retried every second, while we hold the sockets
        lines = log_path.read_text(errors="replace").splitlines()
        for client in clients:
            client.close()
        clients.clear()

        logged = [line for line in lines if "cannot accept connections" in line]
        assert 1 <= len(logged) <= 2  # once per 10 s (two if the machine is slow enough to cross one)
        assert not any("Traceback" in line or "out of system resource" in line for line in lines)
        assert any("may open 48 files, less than KRULES_HTTP_MAX_CONNECTIONS=1000" in line for line in lines)
        with httpx.Client(timeout=GUARD) as http:  # descriptors free again: served, and counted
            metrics = http.get(f"http://127.0.0.1:{port}/metrics").text
        failed = re.search(r"^krules_http_accept_errors_total (\S+)$", metrics, re.M)
        assert failed is not None and float(failed.group(1)) > 1
    finally:
        for client in clients:
            client.close()
        child.terminate()
        child.wait(timeout=GUARD)


def wait_for_log(path: Path, pattern: str, child: subprocess.Popen[bytes]) -> re.Match[str]:
    deadline = time.monotonic() + GUARD
    while True:
        found = re.search(pattern, path.read_text(errors="replace"))
        if found:
            return found
        if child.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"krules run never logged {pattern!r}; log:\n{path.read_text(errors='replace')}")
        time.sleep(0.05)
