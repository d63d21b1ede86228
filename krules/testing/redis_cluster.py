"""A throwaway Redis Cluster on loopback: primaries and their replicas, for tests and benchmarks.

Each node is a :class:`~krules.testing.redis_server.LocalRedisServer` on a free port, in a directory
of its own, started with ``--cluster-enabled yes``; ``redis-cli --cluster create`` then spreads the
16,384 slots over the primaries and gives each its replicas.  Nodes keep nothing on disk (but their
``nodes.conf``) and are stopped by process id.  The node timeout is short (``node_timeout_ms``), so
that a replica takes over a killed primary within a few seconds.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Final

import redis

from krules.errors import ConfigurationError, StorageUnavailableError
from krules.testing.redis_server import LocalRedisServer, StartedByWith, find_redis_server

__all__ = ["LocalRedisCluster"]

_READY_TIMEOUT: Final = 30.0
_BUS_OFFSET: Final = 10_000


def _cluster_port() -> int:
    """A free loopback port whose cluster bus port (10,000 higher, so at most 55,535) is free too."""
    for _ in range(1000):
        port = random.randrange(20_000, 55_536)
        if all(_free(p) for p in (port, port + _BUS_OFFSET)):
            return port
    raise StorageUnavailableError("found no free pair of loopback ports for a Redis Cluster node.")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class LocalRedisCluster(StartedByWith):
    """``primaries`` primaries with ``replicas`` replicas each, all on 127.0.0.1."""

    def __init__(
        self,
        directory: Path,
        *,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
        executable: str | None = None,
    ) -> None:
        found = executable or find_redis_server()
        cli = shutil.which("redis-cli")
        if found is None or cli is None:
            raise ConfigurationError(
                "redis-server or redis-cli is not installed (not found on PATH); install them (Debian: "
                "apt-get install redis-server) to start a local Redis Cluster."
            )
        self.cli: Final = cli
        self.replicas: Final = replicas
        options = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
        )  # fmt: skip
        self.nodes: Final = [
            LocalRedisServer(directory / f"node-{i}", port=_cluster_port(), executable=found, options=options)
            for i in range(primaries * (1 + replicas))
        ]
        self._primaries = primaries

    @property
    def url(self) -> str:
        """The cluster's ``redis+cluster://`` URL, naming every node started as a primary."""
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[: self._primaries])
        return f"redis+cluster://{seeds}/"

    def start(self) -> None:
        """Start every node, join them into one cluster and return once every node sees it whole."""
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        replicas = ("--cluster-replicas", str(self.replicas))
        created = subprocess.run(
            [self.cli, "--cluster", "create", *addresses, *replicas, "--cluster-yes"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            self.stop()
            raise StorageUnavailableError(
                f"redis-cli --cluster create failed: {(created.stdout + created.stderr).strip()[-500:]!r}."
            )
        self.wait_until_ok()

    def wait_until_ok(self, timeout: float = _READY_TIMEOUT, *, replicas: int | None = None) -> None:
        """Return once every running node says ``cluster_state:ok``, agrees on who serves every slot
        and lists ``replicas`` replicas of each primary (default: as many as it was started with;
        0 after a failover, the dead primary's replica having taken over); raise if that does not
        happen within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self._settled(self.replicas if replicas is None else replicas):
            if time.monotonic() > deadline:
                raise StorageUnavailableError(
                    f"the local Redis Cluster did not settle within {timeout:.0f} s; see the logs in "
                    f"{self.nodes[0].directory.parent}."
                )
            time.sleep(0.1)

    @property
    def primaries(self) -> list[LocalRedisServer]:
        """The running nodes serving slots now."""
        ports = dict.fromkeys(int(primary[1]) for _, _, primary, *_ in self._slots())
        return [self._node(port) for port in ports]

    def primary_of(self, slot: int) -> LocalRedisServer:
        """The running node serving ``slot`` now."""
        for start, end, primary, *_ in self._slots():
            if start <= slot <= end:
                return self._node(int(primary[1]))
        raise LookupError(f"no node serves slot {slot}")

    def replicas_of(self, primary: LocalRedisServer) -> list[LocalRedisServer]:
        """The running replicas of ``primary``."""
        for _, _, served_by, *replicas in self._slots():
            if int(served_by[1]) == primary.port:
                return [self._node(int(replica[1])) for replica in replicas]
        return []

    def start_moving_slot(self, slot: int, to: LocalRedisServer) -> LocalRedisServer:
        """Mark ``slot`` as migrating from its primary to primary ``to`` (keys not moved yet: the
        source answers ``ASK`` for keys it does not hold); return the source."""
        source = self.primary_of(slot)
        with self._client(source) as src, self._client(to) as dst:
            dst.execute_command(
                "CLUSTER", "SETSLOT", slot, "IMPORTING", src.execute_command("CLUSTER", "MYID")
            )
            src.execute_command(
                "CLUSTER", "SETSLOT", slot, "MIGRATING", dst.execute_command("CLUSTER", "MYID")
            )
        return source

    def finish_moving_slot(self, slot: int, source: LocalRedisServer, to: LocalRedisServer) -> None:
        """Move the keys of ``slot`` from ``source`` to ``to`` and make ``to`` serve it everywhere
        (the source then answers ``MOVED``)."""
        with self._client(source) as src, self._client(to) as dst:
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
            target = dst.execute_command("CLUSTER", "MYID")
        for node in self.nodes:
            if node.running:
                with self._client(node) as client:
                    if client.execute_command("ROLE")[0] in (b"master", "master"):
                        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)
        self.wait_until_ok(replicas=0)

    def stop(self) -> None:
        """Stop every node (by process id)."""
        for node in self.nodes:
            node.stop(kill=True)

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _client(node: LocalRedisServer) -> redis.Redis:
        return redis.Redis(port=node.port, socket_timeout=5.0)

    def _node(self, port: int) -> LocalRedisServer:
        return next(node for node in self.nodes if node.port == port)

    def _slots(self) -> list[list[Any]]:
        for node in self.nodes:
            if node.running:
                try:
                    with redis.Redis(port=node.port, socket_timeout=2.0) as client:
                        slots: list[list[Any]] = client.execute_command("CLUSTER", "SLOTS")
                        return slots
                except redis.RedisError:
                    continue
        return []

    def _settled(self, replicas: int) -> bool:
        views: set[tuple[tuple[int, int, int], ...]] = set()
        for node in self.nodes:
            if not node.running:
                continue
            try:
                with redis.Redis(port=node.port, socket_timeout=2.0) as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    slots = client.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
            if any(len(s) - 3 < replicas for s in slots):
                return False  # a replica not known everywhere yet
            views.add(tuple(sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in slots)))
        if len(views) != 1:
            return False
        (view,) = views
        return sum(end - start + 1 for start, end, _ in view) == 16384
