"""docker-compose.yml, checked and run without Docker, so the compose file cannot rot.

The file is read as data: a ``redis`` service with the append-only file on, and krules services
owning partitions 0 and 1 with published ports.  Then each krules service's command runs as a local
process (the Dockerfile's ``ENTRYPOINT ["krules"]`` plus the service's ``command``) with the
Dockerfile's and the service's environment, changing only what must differ on this machine: the
Redis host ``redis:6379`` becomes a local redis-server, and the published ports become free local
ports on 127.0.0.1.  Orders sent over HTTP to both instances must all end ``shipped``, and SIGTERM
must stop both instances with exit code 0.
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
from storage.redis.keys import KeySchema

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
    return {
        name: service
        for name, service in compose["services"].items()
        if "KRULES_PARTITION_ID" in (service.get("environment") or {})
    }


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """``(host address, host port, container port)`` of each port the service publishes."""
    out = []
    for spec in service.get("ports") or ():
        parts = str(spec).split(":")
        if len(parts) != 3:
            raise AssertionError(f"expected ports as 'address:host:container', not {spec!r}")
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


# -- the compose file ------------------------------------------------------------------------------
def test_compose_runs_redis_with_an_append_only_file_and_two_instances_owning_one_partition_each() -> None:
    compose = load_compose()
    redis_service = compose["services"]["redis"]
    command = [str(part) for part in redis_service["command"]]
    services = krules_services(compose)
    entrypoint, image_env = dockerfile()

    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert entrypoint == ["krules"]
    envs = {name: {**image_env, **service_env(service)} for name, service in services.items()}
    assert sorted(env["KRULES_PARTITION_ID"] for env in envs.values()) == ["0", "1"]
    assert len({env["KRULES_CONSUMER"] for env in envs.values()}) == len(envs)
    for name, service in services.items():
        env = envs[name]
        assert env["KRULES_PARTITIONS"] == "2", name
        assert env["KRULES_REDIS_URL"].startswith(f"redis://{COMPOSE_REDIS}/"), name
        assert service["command"][0] == "run", name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        ports = published(service)
        assert ports, f"{name} publishes no port"
        assert {address for address, _, _ in ports} == {"127.0.0.1"}, f"{name} publishes beyond loopback"
        assert [container for _, _, container in ports] == [int(env["KRULES_HTTP_PORT"])], name
    host_ports = [port for s in services.values() for _, port, _ in published(s)]
    assert len(set(host_ports)) == len(host_ports)


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


def test_the_compose_services_run_as_local_processes_ship_orders_sent_to_either_and_stop_with_0(
    redis_server_factory: Callable[..., LocalRedisServer],
    run_service: Callable[[str, list[str], dict[str, str]], Service],
) -> None:
    compose = load_compose()
    entrypoint, image_env = dockerfile()
    server = redis_server_factory(persistent=True)  # the compose Redis keeps an append-only file too
    envs = {name: local_env(image_env, s, server.url) for name, s in krules_services(compose).items()}
    services = [
        run_service(name, local_command(entrypoint, compose["services"][name]["command"]), env)
        for name, env in envs.items()
    ]
    urls = [service.wait_ready() for service in services]
    some_env = next(iter(envs.values()))
    keys = KeySchema(some_env["KRULES_KEY_PREFIX"], int(some_env["KRULES_PARTITIONS"]))
    orders = {f"order-{n}": 10 + n for n in range(ORDERS)}
    assert {keys.partition(name) for name in orders} == {0, 1}  # each instance owns some orders

    for n, (name, total) in enumerate(orders.items()):
        assert httpx.get(f"{urls[n % 2]}/healthz", timeout=10).status_code == 200
        with KRulesClient(urls[n % 2], some_env.get("KRULES_INGRESS_TOKEN")) as client:
            client.emit("order.submitted", name, {"total": total, "customer": "ada", "items": ["book"]})

    store = redis.Redis.from_url(server.url, decode_responses=True)
    try:

        def stored(name: str, prop: str) -> Any:
            raw = store.hget(keys.subject(name), f"p:{prop}")
            return None if raw is None else json.loads(raw)

        deadline = time.monotonic() + FINISH_TIMEOUT
        while any(stored(name, "status") != "shipped" for name in orders):
            if time.monotonic() > deadline:
                statuses = {name: stored(name, "status") for name in orders}
                pytest.fail(
                    f"not every order shipped: {statuses}\n" + "\n".join(s.describe() for s in services),
                    pytrace=False,
                )
            time.sleep(0.05)
        assert {name: stored(name, "paid_amount") for name in orders} == orders
    finally:
        store.close()
    for service in services:
        assert service.terminate() == 0, service.describe()
        assert "krules stopped by SIGTERM" in service.log
        assert "Traceback" not in service.log, service.describe()
