"""Real ``krules run`` processes on a real redis-server, for the tests of Redis mode as deployed.

Shared by the partition fault tests and the partition ownership tests (their fixtures,
``start_instance`` and ``deployment_factory``, are in this folder's ``conftest.py``):

* :func:`instance_env` is one instance's environment, :class:`Instance` the ``krules run`` child
  process with its log, :func:`assert_clean_exit` a SIGTERM that must end it cleanly;
* :class:`Deployment` reads what the instances did straight from Redis (stream progress, leases,
  registrations, dead letters) and sends events as another service would, through
  :class:`~krules.transport.stream_client.AsyncStreamClient`;
* :func:`wait_until` and :func:`wait_finished` wait with deadlines that guard against a hang: they
  are never the assertion.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from krules.transport.stream_client import AsyncStreamClient
from storage.redis.keys import CONSUMER_GROUP, KeySchema, lease_epoch, lease_holder

REPO = Path(__file__).resolve().parents[2]

START_TIMEOUT = 20.0
FINISH_TIMEOUT = 45.0
"""Guards against a hang, not timing assertions: a healthy run of a test's events takes seconds."""


# -- the instances ---------------------------------------------------------------------------------
def instance_env(
    url: str, prefix: str, *, partitions: int | None, partition_id: str, consumer: str, **more: str
) -> dict[str, str]:
    """The environment of one instance (``partitions`` None: the recorded count); short block and
    claim times, so nothing waits long; ``more``: further variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRULES_")}
    env.update(
        PYTHONUNBUFFERED="1",
        KRULES_REDIS_URL=url,
        KRULES_KEY_PREFIX=prefix,
        KRULES_PARTITION_ID=partition_id,
        KRULES_CONSUMER=consumer,
        KRULES_HTTP_PORT="0",
        KRULES_STREAM_BLOCK_MS="100",
        KRULES_CLAIM_IDLE_MS="1000",
    )
    if partitions is not None:
        env["KRULES_PARTITIONS"] = str(partitions)
    env.update(more)
    return env


def wait_until(condition: Callable[[], bool], timeout: float, what: str, details: Callable[[], str]) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` and ``details()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s\n{details()}", pytrace=False)
        time.sleep(0.02)


class Instance:
    """``krules run <rules>`` in a child process, its stderr in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, rules: Path) -> None:
        self.env = env
        self.name = env["KRULES_CONSUMER"]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "krules", "run", str(rules)],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def describe(self) -> str:
        state = "running" if self.running else f"exited with {self.process.returncode}"
        tail = "\n".join(self.log.splitlines()[-25:])
        return f"--- {self.log_path.name} ({state}), last lines:\n{tail}"

    def wait_reading(self) -> None:
        """Wait until the instance reads (or stands by for) its partitions: its partition count is
        recorded then, and it is registered."""
        wait_until(
            lambda: "krules.worker: instance " in self.log or not self.running,
            START_TIMEOUT,
            "the instance reading its partitions",
            self.describe,
        )
        if not self.running:
            pytest.fail(f"krules run ended while starting\n{self.describe()}", pytrace=False)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing finishes."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=START_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: the process stands still (a long GC pause, a frozen VM), holding what it holds."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self.process.send_signal(signal.SIGCONT)

    def terminate(self) -> int:
        """SIGTERM; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=FINISH_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"krules run did not exit after SIGTERM\n{self.describe()}", pytrace=False)

    def close(self) -> None:
        if self.running:
            self.process.kill()
            self.process.wait()
        self._log.close()


def assert_clean_exit(instance: Instance) -> None:
    assert instance.terminate() == 0, instance.describe()
    assert "Traceback" not in instance.log, instance.describe()


def partitions_status(env: dict[str, str]) -> dict[str, Any]:
    """``krules partitions --json`` run in the environment ``env``, parsed."""
    status = subprocess.run(
        [sys.executable, "-m", "krules", "partitions", "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    result: dict[str, Any] = json.loads(status.stdout)
    return result


# -- the deployment, read from Redis ---------------------------------------------------------------
def _open_redis(url: str) -> Any:
    """A redis-py client for ``url``: a ``RedisCluster`` for krules' ``redis+cluster://`` URLs."""
    if not url.startswith("redis+cluster://"):
        return redis.Redis.from_url(url, decode_responses=True)
    seeds = url.removeprefix("redis+cluster://").rstrip("/").split(",")
    nodes = [ClusterNode(host, int(port)) for host, port in (seed.rsplit(":", 1) for seed in seeds)]
    return RedisCluster(startup_nodes=nodes, decode_responses=True)


class Deployment:
    """What the tests read and send, straight from Redis: stream progress, leases, registrations,
    committed event ids, dead letters."""

    def __init__(self, url: str, prefix: str, partitions: int) -> None:
        self.url = url
        self.prefix = prefix
        self.keys = KeySchema(prefix, partitions)
        self.redis: Any = _open_redis(url)

    def close(self) -> None:
        self.redis.close()

    # sending
    def emit(self, specs: list[dict[str, Any]]) -> list[str]:
        """Queue the events ``specs`` (as given to ``emit_batch``); their ids."""
        return asyncio.run(self._emit(specs))

    async def _emit(self, specs: list[dict[str, Any]]) -> list[str]:
        async with AsyncStreamClient(self.url, self.prefix) as client:
            return await client.emit_batch(specs)

    # reading
    def prop(self, subject: str, name: str) -> Any:
        raw = self.redis.hget(self.keys.subject(subject), f"p:{name}")
        return None if raw is None else json.loads(raw)

    def owners(self) -> dict[int, str | None]:
        """Each partition's owner, by its lease ``<epoch>:<instance>:<nonce>`` (None: no lease)."""
        leases = self._leases()
        return {p: None if lease is None else lease_holder(lease) for p, lease in enumerate(leases)}

    def epochs(self) -> dict[int, int | None]:
        """Each partition's lease epoch (None: no lease)."""
        leases = self._leases()
        return {p: None if lease is None else lease_epoch(lease) for p, lease in enumerate(leases)}

    def _leases(self) -> list[str | None]:
        keys = [self.keys.lease(p) for p in range(self.keys.partitions)]
        if isinstance(self.redis, RedisCluster):  # one slot per partition: no MGET across them
            return list(self.redis.mget_nonatomic(keys))
        return list(self.redis.mget(keys))

    def registered(self) -> dict[str, list[int]]:
        """The registered instances, each with the partitions it says it holds."""
        return {
            name: json.loads(info).get("partitions", [])
            for name, info in self.redis.hgetall(self.keys.instances()).items()
        }

    def committed_total(self) -> int:
        """How many events the partitions have marked processed so far (0 while Redis is away)."""
        pipe = self.redis.pipeline(transaction=False)
        for p in range(self.keys.partitions):
            pipe.zcard(self.keys.processed(p))
        try:
            return sum(pipe.execute())
        except redis.ConnectionError:
            return 0

    def unfinished(self) -> dict[int, str]:
        """The partitions with entries not yet delivered or still pending, and why."""
        out: dict[int, str] = {}
        for p in range(self.keys.partitions):
            stream = self.keys.stream(p)
            if not self.redis.exists(stream):
                continue
            last = self.redis.xinfo_stream(stream)["last-generated-id"]
            group = next((g for g in self.redis.xinfo_groups(stream) if g["name"] == CONSUMER_GROUP), None)
            if group is None:
                out[p] = "no consumer group"
            elif group["pending"] or group["last-delivered-id"] != last:
                delivered = group["last-delivered-id"]
                out[p] = f"{group['pending']} pending, last delivered {delivered}, last added {last}"
        return out

    def finished(self) -> bool:
        try:
            return not self.unfinished()
        except redis.ConnectionError:
            return False

    def dead_letters(self) -> int:
        """Dead letters of any kind: parked stream entries and ``dlq-<id>`` subjects (by their index)."""
        parked = sum(self.redis.xlen(self.keys.dead_letter_stream(p)) for p in range(self.keys.partitions))
        indexed = self.redis.hkeys(self.keys.subject("dlq-index"))
        return parked + sum(field.startswith("p:") for field in indexed)

    def progress(self) -> str:
        """How far the events sent are processed, in words (for failure messages)."""
        return f"{self.committed_total()} event(s) committed"

    def describe(self) -> str:
        try:
            return (
                f"{self.progress()}; unfinished partitions {self.unfinished()}; "
                f"dead letters {self.dead_letters()}; owners {self.owners()}"
            )
        except redis.RedisError as exc:
            return f"Redis unreadable: {exc!r}"


def wait_finished(deployment: Deployment, *instances: Instance, timeout: float = FINISH_TIMEOUT) -> None:
    """Wait until every entry of every partition was delivered and committed (all instances alive)."""

    def done() -> bool:
        dead = [i for i in instances if not i.running]
        if dead:
            pytest.fail("krules run ended while processing\n" + "\n".join(i.describe() for i in dead))
        return deployment.finished()

    wait_until(
        done,
        timeout,
        "processing every event",
        lambda: "\n".join([deployment.describe(), *(i.describe() for i in instances)]),
    )
