"""A throwaway Sentinel-managed Redis on loopback: a primary, its replicas and sentinels, for tests.

The primary and replicas are :class:`~krules.testing.redis_server.LocalRedisServer` processes; each
sentinel is ``redis-server <generated sentinel.conf> --sentinel`` in a directory of its own (Sentinel
rewrites its configuration file as it learns).  Everything listens on free loopback ports, keeps
nothing on disk and is stopped by process id.  A primary is taken for down after
``down_after_ms`` (1 s), so a failover takes a few seconds.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Final

import redis

from krules.errors import ConfigurationError, StorageUnavailableError
from krules.testing.redis_server import LocalRedisServer, StartedByWith, find_redis_server, free_port

__all__ = ["LocalRedisSentinel"]

_READY_TIMEOUT: Final = 30.0
SERVICE: Final = "krules"


class _SentinelProcess:
    """One ``redis-server --sentinel`` process."""

    def __init__(self, directory: Path, executable: str) -> None:
        self.directory: Final = directory
        self.port: Final = free_port()
        self._executable = executable
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, primary_port: int, quorum: int, down_after_ms: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"logfile {self.directory / 'sentinel.log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        self._process = subprocess.Popen(
            [self._executable, str(config), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()


class LocalRedisSentinel(StartedByWith):
    """A primary with ``replicas`` replicas, watched by ``sentinels`` sentinels, all on 127.0.0.1."""

    def __init__(
        self,
        directory: Path,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        executable: str | None = None,
    ) -> None:
        found = executable or find_redis_server()
        if found is None:
            raise ConfigurationError(
                "redis-server is not installed (not found on PATH); install it (Debian: apt-get install "
                "redis-server) to start a local Sentinel-managed Redis."
            )
        self.servers: Final = [LocalRedisServer(directory / "server-0", executable=found)]
        self.servers.extend(
            LocalRedisServer(
                directory / f"server-{i + 1}",
                executable=found,
                options=("--replicaof", "127.0.0.1", str(self.servers[0].port)),
            )
            for i in range(replicas)
        )
        self.sentinels: Final = [
            _SentinelProcess(directory / f"sentinel-{i}", found) for i in range(sentinels)
        ]
        self._down_after_ms = down_after_ms

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL naming every sentinel and the service."""
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> None:
        """Start the servers and the sentinels; return once every sentinel knows the replicas and
        the other sentinels (a failover needs both)."""
        for server in self.servers:
            server.start()
        quorum = len(self.sentinels) // 2 + 1
        for sentinel in self.sentinels:
            sentinel.start(self.servers[0].port, quorum, self._down_after_ms)
        self.wait_until_watched()

    def wait_until_watched(self, timeout: float = _READY_TIMEOUT, *, replicas: int | None = None) -> None:
        """Return once every sentinel sees the primary up with ``replicas`` replicas in step (default:
        as many as were started) and knows every other sentinel."""
        wanted = len(self.servers) - 1 if replicas is None else replicas
        deadline = time.monotonic() + timeout
        while not self._watched(wanted):
            if time.monotonic() > deadline:
                raise StorageUnavailableError(
                    f"the local Sentinel setup did not settle within {timeout:.0f} s; see the logs in "
                    f"{self.sentinels[0].directory.parent}."
                )
            time.sleep(0.1)

    @property
    def primary(self) -> LocalRedisServer:
        """The running server the sentinels name as the primary now."""
        for sentinel in self.sentinels:
            try:
                with redis.Redis(port=sentinel.port, socket_timeout=2.0) as client:
                    _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            except (redis.RedisError, TypeError, ValueError):
                continue
            return next(server for server in self.servers if server.port == int(port))
        raise LookupError("no sentinel names a primary")

    def stop(self) -> None:
        """Stop the sentinels and the servers (by process id)."""
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop(kill=True)

    def _watched(self, replicas: int) -> bool:
        for sentinel in self.sentinels:
            try:
                with redis.Redis(port=sentinel.port, socket_timeout=2.0, decode_responses=True) as client:
                    state = client.execute_command("SENTINEL", "MASTER", SERVICE)
            except redis.RedisError:
                return False
            fields = dict(zip(state[::2], state[1::2], strict=True)) if isinstance(state, list) else state
            if "s_down" in str(fields.get("flags", "")) or "o_down" in str(fields.get("flags", "")):
                return False
            if int(fields.get("num-slaves", 0)) < replicas:
                return False
            if int(fields.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
        primary = self.primary
        with redis.Redis(port=primary.port, socket_timeout=2.0) as client:
            info = client.info("replication")
        online = sum(
            1
            for name, value in info.items()
            if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
        )
        return online >= replicas
