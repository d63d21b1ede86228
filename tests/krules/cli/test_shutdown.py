"""``krules run`` stopping with work in flight, as a real process: SIGTERM stops accepting and finishes
the turns in flight within ``KRULES_SHUTDOWN_TIMEOUT``, then abandons the rest (counted, answered
503, exit 1); a second signal stops it at once; in Redis mode what is abandoned stays pending and is
processed by the next run.

Deadlines in these tests guard against a hang and are never what is asserted: a test of the
shutdown deadline sets it to one second and waits up to a minute; a test of the second signal sets
it to ten minutes and waits a minute."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from krules.partitioning import partition_of
from krules.testing.redis_server import LocalRedisServer
from storage.redis.keys import CONSUMER_GROUP, KeySchema

pytestmark = pytest.mark.slow

GUARD = 60.0

RULES = '''
"""Jobs that wait for ever when JOB_BLOCKS=1, take JOB_SECONDS otherwise."""
import asyncio
import os

from krules import on


@on("job.run")
async def run(ctx):
    if os.environ.get("JOB_BLOCKS") == "1":
        await asyncio.Event().wait()
    await asyncio.sleep(float(os.environ.get("JOB_SECONDS", "0")))
    await ctx.subject.set("runs", lambda n: (n or 0) + 1)
'''


class Krules:
    """``krules run`` of the job rules in a child process, its log in a file."""

    def __init__(self, tmp_path: Path, name: str, **env: str) -> None:
        rules = tmp_path / "job_rules.py"
        rules.write_text(RULES)
        self.log_path = tmp_path / f"{name}.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("KRULES_")}
        environment.update(PYTHONUNBUFFERED="1", KRULES_HTTP_PORT="0", **env)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "krules", "run", str(rules)],
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.url = self.wait_for(r"krules ready on (http://\S+)").group(1)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + GUARD
        while not (found := re.search(pattern, self.log)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"krules run never logged {pattern!r}; log:\n{self.log}")
            time.sleep(0.05)
        return found

    def metric(self, sample: str) -> float:
        """A sample of ``/metrics`` (``name`` or ``name{label="value"}``), 0 when not exported."""
        text = httpx.get(self.url + "/metrics", timeout=GUARD).text
        found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def exit_code(self) -> int:
        """Wait for the process to end (a guard: failing the test if it does not)."""
        try:
            return self.process.wait(timeout=GUARD)
        except subprocess.TimeoutExpired:
            pytest.fail(f"krules run did not exit within {GUARD:.0f} s; log:\n{self.log}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Krules]]:
    started: list[Krules] = []

    def start(name: str = "krules", **env: str) -> Krules:
        child = Krules(tmp_path, name, **env)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


def post_without_waiting(url: str, event_id: str, subject: str = "job-1") -> socket.socket:
    """Send one event over a raw socket and return it unread (the answer comes when its turn is over)."""
    address = httpx.URL(url)
    body = json.dumps(
        {"specversion": "1.0", "id": event_id, "source": "tests", "type": "job.run", "subject": subject}
    ).encode()
    sock = socket.create_connection((address.host, address.port), timeout=GUARD)
    sock.sendall(
        b"POST /events HTTP/1.1\r\nhost: krules\r\ncontent-type: application/cloudevents+json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def answer(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {GUARD:.0f} s")
        time.sleep(0.05)


def test_sigterm_finishes_the_turns_in_flight_and_exits_0(spawn: Callable[..., Krules]) -> None:
    child = spawn(JOB_SECONDS="1")
    sent = [post_without_waiting(child.url, f"ev-{i}", f"job-{i}") for i in range(3)]
    wait_until(lambda: child.metric('krules_events_received_total{type="job.run"}') == 3, "3 turns running")

    child.process.send_signal(signal.SIGTERM)

    assert child.exit_code() == 0
    for sock in sent:
        assert answer(sock).startswith(b"HTTP/1.1 200 ")
    assert "not finished" not in child.log
    assert "Traceback" not in child.log


def test_sigterm_with_a_backlog_abandons_it_at_the_deadline_answering_503_and_exits_1(
    spawn: Callable[..., Krules],
) -> None:
    child = spawn(JOB_BLOCKS="1", KRULES_SHUTDOWN_TIMEOUT="1")
    sent = [post_without_waiting(child.url, f"ev-{i}") for i in range(20)]  # one subject: 1 runs, 19 wait
    wait_until(lambda: child.metric("krules_turns_queued") == 19, "19 turns queued")

    child.process.send_signal(signal.SIGTERM)

    assert child.exit_code() == 1
    assert "krules stopping" in child.log
    assert re.search(
        r"stopped at the shutdown deadline \(1 s, KRULES_SHUTDOWN_TIMEOUT\) with 20 turn\(s\) not finished "
        r"\(19 of them not started\); they are lost",
        child.log,
    )
    for sock in sent:
        reply = answer(sock)
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
        assert b"\r\nretry-after: 1\r\n" in reply.lower()
    assert "Traceback" not in child.log


def test_a_second_signal_stops_at_once_whatever_the_deadline(spawn: Callable[..., Krules]) -> None:
    child = spawn(JOB_BLOCKS="1", KRULES_SHUTDOWN_TIMEOUT="600")
    sent = [post_without_waiting(child.url, f"ev-{i}") for i in range(5)]
    wait_until(lambda: child.metric("krules_turns_queued") == 4, "4 turns queued")
    child.process.send_signal(signal.SIGTERM)
    child.wait_for(r"krules stopping")

    child.process.send_signal(signal.SIGINT)

    assert child.exit_code() == 1  # well before the ten minutes of the deadline
    assert "stopped on a second stop with 5 turn(s) not finished (4 of them not started)" in child.log
    for sock in sent:
        assert answer(sock).startswith(b"HTTP/1.1 503 ")
    assert "Traceback" not in child.log


@pytest.mark.redis_server
def test_redis_mode_leaves_what_the_deadline_cut_pending_for_the_next_run(
    spawn: Callable[..., Krules], redis_server: LocalRedisServer, redis_key_prefix: str
) -> None:
    env = {
        "KRULES_REDIS_URL": redis_server.url,
        "KRULES_KEY_PREFIX": redis_key_prefix,
        "KRULES_CONSUMER": "jobs",
        "KRULES_STREAM_BLOCK_MS": "100",
        "KRULES_SHUTDOWN_TIMEOUT": "1",
    }
    blocked = spawn("blocked", JOB_BLOCKS="1", **env)
    with httpx.Client(timeout=GUARD) as http:
        batch = [
            {
                "specversion": "1.0",
                "id": f"ev-{i}",
                "source": "tests",
                "type": "job.run",
                "subject": f"job-{i}",
            }
            for i in range(10)
        ]
        sent = http.post(blocked.url + "/events", content=json.dumps(batch), headers={"content-type": BATCH})
    assert sent.status_code == 202
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    keys = KeySchema(redis_key_prefix, 1)
    stream = keys.stream(0)
    assert {partition_of(f"job-{i}", 1) for i in range(10)} == {0}
    try:
        wait_until(lambda: client.xpending(stream, CONSUMER_GROUP)["pending"] == 10, "10 entries delivered")

        blocked.process.send_signal(signal.SIGTERM)

        assert blocked.exit_code() == 1
        assert "their stream entries stay pending" in blocked.log
        assert client.xpending(stream, CONSUMER_GROUP)["pending"] == 10

        again = spawn("again", **env)  # the same consumer takes its pending entries back first
        wait_until(lambda: all(client.hget(keys.subject(f"job-{i}"), "p:runs") for i in range(10)), "all run")
        runs = [client.hget(keys.subject(f"job-{i}"), "p:runs") for i in range(10)]
        assert runs == ["1"] * 10
        again.process.send_signal(signal.SIGTERM)
        assert again.exit_code() == 0
    finally:
        client.close()


BATCH = "application/cloudevents-batch+json"
