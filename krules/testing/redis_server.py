"""A throwaway ``redis-server`` on a free loopback port: for tests, benchmarks and demos.

It runs in a directory of its own, listens on 127.0.0.1 only, and keeps nothing on disk unless
asked to (``persistent=True`` turns on an fsync-always append-only file, so data survives a
``kill -9`` and a restart on the same port).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from krules.errors import ConfigurationError, StorageUnavailableError

__all__ = ["LocalRedisServer", "find_redis_server", "free_port"]

_STARTUP_TIMEOUT: Final = 15.0
_SHUTDOWN_TIMEOUT: Final = 10.0


def find_redis_server() -> str | None:
    """Return the path of the ``redis-server`` executable, or None when it is not installed."""
    return shutil.which("redis-server")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _command(*parts: str) -> bytes:
    """Encode one command in the Redis protocol (RESP)."""
    encoded = [p.encode("utf-8") for p in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in encoded)


class StartedByWith:
    """``with`` starts it and stops it again (the subclass's ``start()`` and ``stop()``)."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class LocalRedisServer(StartedByWith):
    """One ``redis-server`` process; ``start``/``stop``/``restart`` keep the same port and directory."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        persistent: bool = False,
        executable: str | None = None,
        options: Sequence[str] = (),
    ) -> None:
        """``options``: more ``redis-server`` command-line options (e.g. ``--cluster-enabled yes``)."""
        found = executable or find_redis_server()
        if found is None:
            raise ConfigurationError(
                "redis-server is not installed (not found on PATH); install it (Debian: apt-get install "
                "redis-server) or point KRULES_REDIS_URL at a running server."
            )
        self.executable: Final = found
        self.directory: Final = directory
        self.port: Final = port if port is not None else free_port()
        self.password: Final = password
        self.persistent: Final = persistent
        self.options: Final = tuple(options)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's ``redis://`` URL, with the password when there is one."""
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "redis.log"

    @property
    def pid(self) -> int | None:
        """The process id while the server runs."""
        return self._process.pid if self._process is not None and self.running else None

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and return once it answers PING; raise if it does not within 15 s."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--logfile", str(self.log_path),
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.options
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                raise StorageUnavailableError(
                    f"redis-server on port {self.port} did not come up within {_STARTUP_TIMEOUT:.0f} s; "
                    f"its log ends with: {self._log_tail()!r}."
                )
            time.sleep(0.02)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (a clean shutdown) or, with ``kill``, SIGKILL (a crash)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(_SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, *, kill: bool = True) -> None:
        """Stop the server (a crash by default) and start it again on the same port and directory."""
        self.stop(kill=kill)
        self.start()

    def _answers(self) -> bool:
        request = _command("PING")
        if self.password:
            request = _command("AUTH", self.password) + request
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(request)
                received = b""
                while received.count(b"\r\n") < (2 if self.password else 1):
                    chunk = sock.recv(4096)
                    if not chunk:
                        return False
                    received += chunk
        except OSError:
            return False
        return received.endswith(b"+PONG\r\n")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace").strip()[-500:]
        return "(no log)"
