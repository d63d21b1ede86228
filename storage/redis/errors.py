"""What the Redis storage does with a driver error: retry it, or report it in one sentence.

Connection failures, timeouts, a server still loading its data, a read-only replica and a write
fewer replicas acknowledged than ``KRULES_REDIS_WAIT_REPLICAS`` asks for are retried
with jittered exponential backoff, then reported as :class:`~krules.errors.StorageUnavailableError`;
rejected credentials and missing permissions are a :class:`~krules.errors.ConfigurationError`; any
other refusal a :class:`~krules.errors.StorageError`.  Messages name the server by its URL without
the password.  The loop that applies this is :meth:`storage.redis.store.RedisStorage.run`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    ClusterDownError,
    NoPermissionError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from krules.errors import ConfigurationError, StorageError, StorageUnavailableError

__all__ = [
    "NOT_RETRIED",
    "SCRIPT_RELOADS",
    "TRANSIENT_ERRORS",
    "NotReplicatedError",
    "back_off",
    "reason",
    "redact",
    "refused",
    "scripts_lost",
    "unavailable",
]

_log = logging.getLogger("storage.redis")  # the storage's logger name since before the re-layout

SCRIPT_RELOADS: Final = 3
"""Times in a row one operation reloads the Lua scripts before giving up."""


class NotReplicatedError(RedisError):
    """Raised (inside the storage, then retried) when fewer replicas than asked for
    (``KRULES_REDIS_WAIT_REPLICAS``) acknowledged a write within the wait's timeout: the primary
    applied it, but it could be lost with the primary, so it is not reported done."""

    def __init__(self, acknowledged: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(
            f"{acknowledged} of the {wanted} replica(s) asked for acknowledged the write "
            f"within {timeout_ms} ms"
        )
        self.acknowledged = acknowledged
        self.wanted = wanted


_CREDENTIAL_ERRORS: Final = (AuthenticationError, AuthenticationWrongNumberOfArgsError, AuthorizationError)

NOT_RETRIED: Final = (NoPermissionError, *_CREDENTIAL_ERRORS)
"""Errors that no retry can fix.  Catch them before :data:`TRANSIENT_ERRORS`: redis-py makes the
authentication errors subclasses of its ``ConnectionError``."""

# ConnectionError covers refused and dropped connections and BusyLoadingError (a restarted server
# still loading its data), and a Redis Cluster node that cannot be reached; READONLY and TRYAGAIN are
# what a failover answers for a moment, CLUSTERDOWN (and MASTERDOWN) a cluster electing a new primary.
TRANSIENT_ERRORS: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    NotReplicatedError,
)
"""Errors worth retrying after a pause (a write not replicated in time is applied again, which the
store script makes harmless: a commit already made only acknowledges its entry)."""


def refused(exc: RedisError, url: str, doing: str) -> StorageError | ConfigurationError:
    """The error to raise for a driver error not retried; ``doing`` completes "could not ..."."""
    if isinstance(exc, NoPermissionError):
        return ConfigurationError(
            f"Redis at {url} does not permit krules to {doing} ({reason(exc)}); "
            "grant its user the hash, scripting and SCAN commands on the keys of its prefix."
        )
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return ConfigurationError(
            f"Redis at {url} refused krules' credentials when asked to "
            f"{doing} ({reason(exc)}); fix the user name or password in the Redis URL."
        )
    if isinstance(exc, AskError):  # MOVED or ASK reached the storage: the URL names one cluster node
        return ConfigurationError(
            f"Redis at {url} is a node of a Redis Cluster and redirected the request to {doing} to "
            f"{exc.host}:{exc.port} (slot {exc.slot_id}); use a redis+cluster:// URL naming the "
            "cluster's nodes (e.g. redis+cluster://host:port,host:port/), so krules routes each "
            "command to the node serving its slot."
        )
    return StorageError(f"Redis at {url} refused to {doing}: {reason(exc)}.")


def unavailable(
    exc: Exception, url: str, doing: str, failures: int, started: float
) -> StorageUnavailableError:
    """The error to raise when retries are spent; ``started`` is the first attempt's monotonic time."""
    if isinstance(exc, NotReplicatedError):
        advice = (
            f"check that the primary has {exc.wanted} replica(s) connected and in step (redis-cli INFO "
            "replication), or lower KRULES_REDIS_WAIT_REPLICAS"
        )
    elif isinstance(exc, ClusterDownError) or getattr(exc, "node", None) is not None:
        advice = (
            "check the cluster with redis-cli --cluster check on one of its nodes: a primary that "
            "died is replaced by its replica within the cluster's node timeout, unless it had none"
        )
    else:
        advice = "check that the server is running and reachable at that address"
    return StorageUnavailableError(
        f"Redis at {url} could not {doing} after {failures} attempts "
        f"in {time.monotonic() - started:.1f} s ({reason(exc)}); {advice}."
    )


def scripts_lost(url: str, reloads: int, doing: str) -> StorageError:
    """The error to raise when the server keeps forgetting the scripts."""
    return StorageError(
        f"Redis at {url} forgot krules' Lua scripts {reloads} times while trying to "
        f"{doing}; check that nothing runs SCRIPT FLUSH in a loop."
    )


async def back_off(exc: Exception, url: str, failures: int, retries: int, backoff: float, cap: float) -> None:
    """Log a transient failure and pause before retry number ``failures``: ``backoff`` doubling up
    to ``cap`` seconds, jittered down by up to half so that retrying clients spread out."""
    delay = min(cap, backoff * 2 ** (failures - 1))
    delay *= 0.5 + random.random() / 2
    _log.warning(
        "Redis at %s failed (%s); retry %d of %d in %.2f s", url, reason(exc), failures, retries, delay
    )
    await asyncio.sleep(delay)


def reason(exc: Exception) -> str:
    """The driver's words for a failure, fit to sit inside one of our sentences."""
    text = " ".join(str(exc).split()).rstrip(".").replace(". ", ": ")
    return text or type(exc).__name__


def redact(url: str) -> str:
    """Return ``url`` without its password and query string (which may carry one)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2].partition('?')[0]}"
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
