"""docker-compose.yml, checked and run without Docker, so the compose file cannot rot.

The file is read as data: a ``redis`` service with the append-only file on, and one krules service
(built from the Dockerfile) run as ``deploy.replicas`` replicas with no per-replica setting: the
partition count set once for the deployment, ids and names left to each instance, and a range of
loopback ports, one per replica.  Then the service's command runs as one local process per replica
(the Dockerfile's ``ENTRYPOINT ["krules"]`` plus the service's ``command``) with the Dockerfile's and
the service's environment, changing only what must differ on this machine: the Redis host
``redis:6379`` becomes a local redis-server, and each replica's published port a free local port on
127.0.0.1.  The replicas must share the partitions evenly by themselves, orders sent over HTTP to
each of them must all end ``shipped``, and SIGTERM must stop every replica with exit code 0.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from krules.http.client import KRulesClient
from krules.testing.redis_server import LocalRedisServer, free_port
from storage.redis.keys import KeySchema, lease_holder

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]

REPO = Path(__file__).resolve().parents[1]
COMPOSE_REDIS = "redis:6379"
"""Where the compose services find Redis: the ``redis`` service's name and port."""
ORDERS = 8
START_TIMEOUT = 20.0
FINISH_TIMEOUT = 30.0
"""Guards against a hang, not timing assertions: the orders ship within a second or two."""


# -- reading the files -----------------------------------------------------------------------------
def load_compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return compose


def dockerfile() -> tuple[list[str], dict[str, str]]:
    """The Dockerfile's ENTRYPOINT (exec form) and its ENV variables."""
    entrypoint: list[str] = []
    env: dict[str, str] = {}
    for line in (REPO / "Dockerfile").read_text().splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif instruction == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return entrypoint, env


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as on a host where no variable it takes from the host is set (a
    variable without a value is passed through from the host only when set there)."""
    return {k: interpolate(v) for k, v in service["environment"].items() if v is not None}


def interpolate(value: object) -> str:
    """A compose value with ``${NAME:-default}`` resolved as on a host where NAME is unset."""
    text = str(value)
    resolved = re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)
    if "$" in resolved:
        raise AssertionError(f"this test cannot interpolate the compose value {text!r}")
    return resolved


def krules_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from the Dockerfile: those run its ``krules`` entry point."""
    return {name: service for name, service in compose["services"].items() if "build" in service}


def replicas(service: dict[str, Any]) -> int:
    """How many replicas ``docker compose up`` starts of a service."""
    count = (service.get("deploy") or {}).get("replicas", 1)
    assert isinstance(count, int) and count >= 1, f"deploy.replicas {count!r} is not a count"
    return count


def published(service: dict[str, Any]) -> list[tuple[str, range, int]]:
    """``(host address, host ports, container port)`` of each port the service publishes (a single
    host port is a range of one)."""
    out = []
    for spec in service.get("ports") or ():
        parts = str(spec).split(":")
        if len(parts) != 3:
            raise AssertionError(f"expected ports as 'address:host:container', not {spec!r}")
        first, _, last = parts[1].partition("-")
        out.append((parts[0], range(int(first), int(last or first) + 1), int(parts[2])))
    return out


# -- the compose file ------------------------------------------------------------------------------
PER_INSTANCE = ("KRULES_PARTITION_ID", "PARTITION_ID", "KRULES_CONSUMER")
"""Settings that would tie the replicas' environment to one instance (all replicas share theirs)."""


def test_compose_runs_redis_with_an_append_only_file_and_one_replicated_krules_service() -> None:
    compose = load_compose()
    redis_service = compose["services"]["redis"]
    command = [str(part) for part in redis_service["command"]]
    services = krules_services(compose)
    entrypoint, image_env = dockerfile()

    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert entrypoint == ["krules"]
    assert list(services) == ["krules"], "one krules service, scaled by replicas"
    service = services["krules"]
    env = {**image_env, **service_env(service)}
    assert replicas(service) >= 2
    assert "container_name" not in service, "a container name cannot be shared by replicas"
    assert [name for name in PER_INSTANCE if name in (service.get("environment") or {})] == []
    assert int(env["KRULES_PARTITIONS"]) >= replicas(service)  # fixed at first start: set once, here
    assert env["KRULES_REDIS_URL"].startswith(f"redis://{COMPOSE_REDIS}/")
    assert service["command"][0] == "run"
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    ports = published(service)
    assert ports, "the krules service publishes no port"
    assert {address for address, _, _ in ports} == {"127.0.0.1"}, "published beyond loopback"
    assert [container for _, _, container in ports] == [int(env["KRULES_HTTP_PORT"])]
    for _, host_ports, _ in ports:  # one host port per replica: a fixed port would clash
        assert len(host_ports) >= replicas(service), f"{host_ports} cannot give each replica a port"


# -- the services, run as local processes ----------------------------------------------------------
class Service:
    """One compose service's command, run as a local process; its stderr in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        state = "running" if self.process.poll() is None else f"exited with {self.process.returncode}"
        return f"--- {self.name} ({state}):\n" + "\n".join(self.log.splitlines()[-25:])

    def wait_ready(self) -> str:
        """The URL the instance serves on, once it also reads its partitions."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            log = self.log
            url = re.search(r"krules ready on (http://\S+)", log)
            if url and "krules.worker: instance " in log:
                return url.group(1)
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not start\n{self.describe()}", pytrace=False)
            time.sleep(0.02)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=FINISH_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit after SIGTERM\n{self.describe()}", pytrace=False)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def run_service(tmp_path: Path) -> Iterator[Callable[[str, list[str], dict[str, str]], Service]]:
    started: list[Service] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> Service:
        started.append(Service(name, argv, env, tmp_path / f"{name}.log"))
        return started[-1]

    yield start
    for service in started:
        service.close()


def local_command(entrypoint: list[str], command: list[Any]) -> list[str]:
    """The container's command line, with its ``krules`` entry point run from this Python."""
    assert entrypoint == ["krules"]
    return [sys.executable, "-m", "krules", *(str(part) for part in command)]


def local_env(image_env: dict[str, str], service: dict[str, Any], redis_url: str) -> dict[str, str]:
    """The service's environment on this machine: local Redis, loopback, a free port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRULES_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(image_env)
    env.update(service_env(service))
    compose_url = f"redis://{COMPOSE_REDIS}/"
    assert env["KRULES_REDIS_URL"].startswith(compose_url)
    env["KRULES_REDIS_URL"] = redis_url.rsplit("/", 1)[0] + "/" + env["KRULES_REDIS_URL"][len(compose_url) :]
    env["KRULES_HTTP_HOST"] = "127.0.0.1"
    env["KRULES_HTTP_PORT"] = str(free_port())
    return env


@pytest.mark.parametrize("scale", [None, 3], ids=["deploy.replicas", "scale=3"])
def test_the_replicas_run_as_local_processes_share_the_partitions_ship_orders_sent_to_each_and_stop_with_0(
    scale: int | None,
    redis_server_factory: Callable[..., LocalRedisServer],
    run_service: Callable[[str, list[str], dict[str, str]], Service],
) -> None:
    """As ``docker compose up`` starts the service (``deploy.replicas``), and as the file's comment
    scales it (``docker compose up --scale krules=3``)."""
    compose = load_compose()
    entrypoint, image_env = dockerfile()
    server = redis_server_factory(persistent=True)  # the compose Redis keeps an append-only file too
    (name, service), *_ = krules_services(compose).items()
    count = scale or replicas(service)
    if scale is not None:
        assert f"--scale {name}={scale}" in (REPO / "docker-compose.yml").read_text()
    envs = [local_env(image_env, service, server.url) for _ in range(count)]  # each its own port
    replicas_run = [
        run_service(f"{name}-{n + 1}", local_command(entrypoint, service["command"]), env)
        for n, env in enumerate(envs)
    ]
    urls = [replica.wait_ready() for replica in replicas_run]
    env = envs[0]
    partitions = int(env["KRULES_PARTITIONS"])
    keys = KeySchema(env["KRULES_KEY_PREFIX"], partitions)
    store = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        # The replicas share the partitions evenly by themselves (no per-replica setting).
        deadline = time.monotonic() + FINISH_TIMEOUT
        while True:
            owners = [owner_of(store.get(keys.lease(p))) for p in range(partitions)]
            shares = sorted(owners.count(owner) for owner in set(owners) if owner is not None)
            if None not in owners and len(shares) == count and shares[-1] - shares[0] <= 1:
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the replicas did not share the {partitions} partitions: owners {owners}\n"
                    + "\n".join(r.describe() for r in replicas_run),
                    pytrace=False,
                )
            time.sleep(0.05)

        orders = {f"order-{n}": 10 + n for n in range(ORDERS)}
        owning = {owners[keys.partition(order)] for order in orders}
        assert len(owning) >= 2, f"the orders all go to partitions of one replica: {owning}"
        for n, (order, total) in enumerate(orders.items()):
            url = urls[n % count]  # through each replica's ingress in turn, whoever owns the order
            assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
            with KRulesClient(url, env.get("KRULES_INGRESS_TOKEN")) as client:
                client.emit("order.submitted", order, {"total": total, "customer": "ada", "items": ["book"]})

        def stored(subject: str, prop: str) -> Any:
            raw = store.hget(keys.subject(subject), f"p:{prop}")
            return None if raw is None else json.loads(raw)

        deadline = time.monotonic() + FINISH_TIMEOUT
        while any(stored(order, "status") != "shipped" for order in orders):
            if time.monotonic() > deadline:
                statuses = {order: stored(order, "status") for order in orders}
                pytest.fail(
                    f"not every order shipped: {statuses}\n" + "\n".join(r.describe() for r in replicas_run),
                    pytrace=False,
                )
            time.sleep(0.05)
        assert {order: stored(order, "paid_amount") for order in orders} == orders
    finally:
        store.close()
    for replica in replicas_run:
        assert replica.terminate() == 0, replica.describe()
        assert "krules stopped by SIGTERM" in replica.log
        assert "Traceback" not in replica.log, replica.describe()


def owner_of(lease: str | None) -> str | None:
    """The instance named in a partition's lease ``<epoch>:<instance>:<nonce>`` (None: no owner)."""
    if lease is None:
        return None
    return lease_holder(lease)
