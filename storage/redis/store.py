"""Redis subject storage: one hash per subject, JSON values, atomic Lua writes, bounded retries.

The key layout is :mod:`storage.redis.keys`; the scripts are ``storage/redis/lua/*.lua``, loaded once per
server (``SCRIPT LOAD`` on :meth:`RedisStorage.check` or on the first ``NOSCRIPT`` reply, e.g. after
a restart) and run with ``EVALSHA``.

A storage made from a URL sends everything on one auto-pipelined connection
(:class:`storage.redis._resp_connection.MultiplexedConnection`): the commands of concurrent turns issued
in the same event-loop iteration go out in one write and share one round trip, so a busy instance
pays far fewer round trips than the table below adds up to.  A client passed in is used as is.

What each operation costs (round trips; commands as ``INFO commandstats`` counts them, including the
ones a script makes)::

    load            1 round trip   HGETALL
    commit(turn)    1 round trip   one EVALSHA: ZSCORE, the store below, ZADD, XACK (+ the other
                                   partitions' writes first, as a store, when the turn made any)
    store(batch)    1 round trip   one EVALSHA per partition touched, sent together; inside, per
                                   subject: HMGET (only for callable updates), one HSET, one HDEL
                                   (only when it deletes; + HLEN when it only deletes)
    get             1              HGET
    set             1              EVALSHA (HGET + HSET)
    delete          1              EVALSHA (HGET + HDEL + HLEN; + HMGET when at most 2 fields remain)
    update          1 or 2         the store script on one subject (HMGET + HSET), betting on the
                                   value this storage last stored there; the first update of a
                                   property (or one whose callable fails on the bet) reads it with
                                   HGET first, and a lost bet costs one more script call
    flush           1              DEL
    subjects        1 per SCAN page

Callable updates are compare-and-set: the store script writes a partition's changes only if every
callable update's property still holds the JSON the callable saw; otherwise it writes nothing and
returns the current values, the client re-applies the callables (:meth:`storage.base.Update.reapply`)
and sends only the conflicting partitions again, at once: the reply carried fresh values, and a pause
would only make them stale.  Plain CAS can starve a writer that keeps arriving just after a faster
one, so after 3 losses in a row a writer *claims* the subjects it lost on (the ``m:c`` field, a
250 ms lease): other callable updates of those subjects then wait, with jittered exponential
backoff, until the claimant has written.  After ``update_attempts`` attempts the client gives up
with :class:`~krules.errors.UpdateConflictError`.  Each call carrying callable updates also records
a random write token in the subjects it updates (the ``m:w`` field keeps the last few): when a
connection drops after the server applied a call but before the reply arrived, the retried call
finds its token and does not apply the callables a second time.

Connection failures, timeouts, a server still loading its data and a read-only replica are retried
with jittered exponential backoff, then reported as :class:`~krules.errors.StorageUnavailableError`
naming the URL without its password; rejected credentials are a
:class:`~krules.errors.ConfigurationError`.  The connection this module opens from a URL does not
retry on its own, so the retry policy is the one configured here; ``socket_timeout`` bounds the wait
for a reply.

A turn's commit (:meth:`RedisStorage.commit`) is the same script with a commit header: if the
partition's processed-id set already holds the event id it only acknowledges the stream entry;
otherwise it writes the changes, adds the id (scored by commit time, trimmed to the dedupe window
now and then) and acknowledges the entry, all at once.  Writes the turn made to subjects of other
partitions are stored first, with a write token derived from the event id, so a turn re-run after
a crash does not apply their callable updates twice.

Limits: the changes of one partition are stored atomically, a batch spanning partitions is stored
partition by partition (on a Redis Cluster they live in different slots).  Plain ``set``/``delete``
calls retried after a lost reply are applied again, which is harmless for the stored value, but the
old value they report may then be their own first write.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from krules.errors import (
    ConfigurationError,
    StorageError,
    StorageUnavailableError,
    UpdateConflictError,
)
from storage.base import DELETE, Change, SubjectChanges, Update, decode, encode
from storage.redis._resp_connection import Arg
from storage.redis.commands import ClientCommands, ConnectionCommands, RedisCommands
from storage.redis.keys import (
    CLAIM_FIELD,
    CONSUMER_GROUP,
    EXTENDED_FIELD_PREFIX,
    PROPERTY_FIELD_PREFIX,
    WRITE_TOKENS_FIELD,
    KeySchema,
    property_field,
)
from storage.redis.scripts import LuaScript, lua_script

__all__ = ["RedisStorage", "StreamCommit", "create_redis_storage"]


class StreamCommit(Protocol):
    """What :meth:`RedisStorage.commit` records with a turn's writes: the partition whose subjects
    they are, the event id marked processed, and the stream entry acknowledged ('' for none)."""

    @property
    def partition(self) -> int: ...
    @property
    def event_id(self) -> str: ...
    @property
    def entry_id(self) -> str: ...


_log = logging.getLogger("storage.redis")  # its name before the re-layout, kept for logging configs

_T = TypeVar("_T")

_TOKENS_KEPT: Final = 16
_TOKEN_BYTES: Final = 8
_SCRIPT_RELOADS: Final = 3
_CLAIM_AFTER: Final = 3  # compare-and-sets lost in a row before a writer claims the subject
_CLAIM_LEASE_MS: Final = 250
_CLAIM_BACKOFF: Final = 0.001
_CLAIM_BACKOFF_CAP: Final = 0.05
_SCAN_COUNT: Final = 1000
_VALUES_KEPT: Final = 1024  # (subject, property) pairs whose last stored value update() remembers
_TRIM_EVERY: Final = 256  # commits between two trims of a partition's processed-id set
_NO_COMMIT: Final = ("", "", "", 0)

_CREDENTIAL_ERRORS: Final = (AuthenticationError, AuthenticationWrongNumberOfArgsError, AuthorizationError)
# ConnectionError covers refused and dropped connections and BusyLoadingError (a restarted server
# still loading its data); READONLY and TRYAGAIN are what a failover answers for a moment.
_TRANSIENT_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TryAgainError)

# Store-script replies (see lua/store.lua).
_CONFLICT: Final = 0
_STORED: Final = 1
_CLAIMED: Final = 2
_ALREADY_COMMITTED: Final = 3

_Reply = list[Any]
_Group = list[SubjectChanges]


def create_redis_storage(
    url: str | aioredis.Redis | None = None,
    key_prefix: str = "krules:",
    *,
    client: aioredis.Redis | None = None,
    redis_prefix: str | None = None,
    partitions: int = 1,
    retries: int = 8,
    retry_backoff: float = 0.05,
    retry_backoff_cap: float = 2.0,
    update_attempts: int = 50,
    connect_timeout: float = 5.0,
    socket_timeout: float = 30.0,
    dedupe_window: float = 3600.0,
) -> RedisStorage:
    """Return a Redis subject storage; nothing is sent to the server before the first call.

    ``url`` defaults to ``redis://127.0.0.1:6379/0``; the storage then opens one auto-pipelined
    connection of its own, used from one event loop.  Pass ``client`` to use a client you built
    (e.g. ``fakeredis.FakeAsyncRedis()``) instead; it is not closed by :meth:`RedisStorage.close`,
    keeps its own retry settings and pool, and ``url`` then only names the server in messages.
    ``partitions`` must be the deployment's partition count: it decides the hash tag of every
    subject key.  ``retries`` bounds the retries of an operation that cannot reach the server
    (``retry_backoff`` doubling up to ``retry_backoff_cap`` seconds, jittered); ``update_attempts``
    bounds the compare-and-set attempts of callable updates under contention.  ``connect_timeout``
    bounds connecting, ``socket_timeout`` the wait for a reply.  ``dedupe_window`` is how long (in
    seconds) a partition remembers the ids of the events it committed, to drop re-deliveries.

    For rule modules ported from KRules, ``create_redis_storage(redis_client, redis_prefix="app:")``
    works too: a client passed first is taken as ``client``, ``redis_prefix`` as ``key_prefix``.
    """
    if url is not None and not isinstance(url, str):
        if client is not None:
            raise ConfigurationError("Pass the Redis client either first or as client=..., not both.")
        url, client = None, url
    if redis_prefix is not None:
        key_prefix = redis_prefix
    keys = KeySchema(key_prefix, partitions)
    _require_count("retries", retries, 0)
    _require_count("update_attempts", update_attempts, 1)
    for name, value in (
        ("retry_backoff", retry_backoff),
        ("retry_backoff_cap", retry_backoff_cap),
        ("connect_timeout", connect_timeout),
        ("socket_timeout", socket_timeout),
        ("dedupe_window", dedupe_window),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigurationError(f"{name} must be a positive number of seconds, not {value!r}.")
    commands: RedisCommands
    if client is not None:
        commands = ClientCommands(client)
        display = _redact(url) if url is not None else commands.server_url()
    else:
        url = url if url is not None else "redis://127.0.0.1:6379/0"
        display = _redact(url)
        try:
            commands = ConnectionCommands.from_url(
                url, connect_timeout=connect_timeout, socket_timeout=socket_timeout
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"The Redis URL {display!r} is not valid ({_reason(exc)}); use "
                "redis://[user:password@]host[:port][/db], rediss://... or unix:///path/to/socket."
            ) from None
    return RedisStorage(
        commands,
        keys,
        url=display,
        retries=retries,
        retry_backoff=retry_backoff,
        retry_backoff_cap=retry_backoff_cap,
        update_attempts=update_attempts,
        dedupe_window=dedupe_window,
    )


class RedisStorage:
    """Subjects as Redis hashes; see the module docstring for the layout, costs and guarantees."""

    def __init__(
        self,
        commands: RedisCommands,
        keys: KeySchema,
        *,
        url: str,
        retries: int,
        retry_backoff: float,
        retry_backoff_cap: float,
        update_attempts: int,
        dedupe_window: float = 3600.0,
    ) -> None:
        self.keys: Final = keys
        self.commands: Final = commands
        """The commands this storage sends (the stream transport sends its own on them too)."""
        self.dedupe_window_ms: Final = int(dedupe_window * 1000)
        self.url: Final = url
        self._commands = commands
        self._retries = retries
        self._retry_backoff = retry_backoff
        self._retry_backoff_cap = retry_backoff_cap
        self._update_attempts = update_attempts
        self._store_script = lua_script("store")
        self._set_script = lua_script("set")
        self._delete_script = lua_script("delete")
        self._scripts = (self._store_script, self._set_script, self._delete_script)
        self._scripts_missing = False
        self._last_values: dict[tuple[str, str], str | None] = {}
        self._commits = 0

    # -- reads ---------------------------------------------------------------------------------

    async def load(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        key = self.keys.subject(name)
        stored = await self._run(partial(self._commands.hgetall, key), "load subject %r", name)
        props: dict[str, Any] = {}
        ext: dict[str, Any] = {}
        for raw_field, raw_value in stored.items():
            field = _text(raw_field)
            if field.startswith(PROPERTY_FIELD_PREFIX):
                props[field[2:]] = decode(raw_value)
            elif field.startswith(EXTENDED_FIELD_PREFIX):
                ext[field[2:]] = decode(raw_value)
        return props, ext

    async def get(self, name: str, prop: str, *, ext: bool = False) -> Any:
        key, field = self.keys.subject(name), property_field(prop, ext)
        raw = await self._run(partial(self._commands.hget, key, field), "read subject %r", name)
        if raw is None:
            raise KeyError(prop)
        return decode(raw)

    async def subjects(self, prefix: str = "") -> list[str]:
        pattern = self.keys.subject_pattern(prefix)

        async def scan() -> set[str]:
            found: set[str] = set()
            cursor = 0
            while True:
                cursor, page = await self._commands.scan(cursor, pattern, _SCAN_COUNT)
                for raw_key in page:
                    name = self.keys.subject_name(_text(raw_key))
                    if name is not None and name.startswith(prefix):
                        found.add(name)
                if cursor == 0:
                    return found

        return sorted(await self._run(scan, "list subjects starting with %r", prefix))

    # -- writes --------------------------------------------------------------------------------

    async def store(self, batch: Sequence[SubjectChanges]) -> None:
        pending = list(self._by_partition(batch).values())
        if pending:
            await self._store_groups(pending, os.urandom(_TOKEN_BYTES).hex(), None)

    async def commit(self, batch: Sequence[SubjectChanges], receipt: StreamCommit) -> bool:
        """Commit a turn (see the module docstring); False when the event was committed before."""
        groups = self._by_partition(batch)
        own = groups.pop(receipt.partition, [])
        if groups:
            # Stored before the commit, with a token that is the same when the turn is re-run.
            token = hashlib.blake2b(receipt.event_id.encode(), digest_size=_TOKEN_BYTES).hexdigest()
            await self._store_groups(list(groups.values()), token, None)
        return await self._store_groups([own], os.urandom(_TOKEN_BYTES).hex(), receipt)

    def _by_partition(self, batch: Sequence[SubjectChanges]) -> dict[int, _Group]:
        by_partition: dict[int, _Group] = {}
        for changes in batch:
            if changes:
                by_partition.setdefault(self.keys.partition(changes.name), []).append(changes)
        return by_partition

    async def _store_groups(self, pending: list[_Group], token: str, receipt: StreamCommit | None) -> bool:
        """Store each group (one partition's changes) with the store script, retrying conflicts."""
        waits = 0
        fresh = True
        for attempt in range(1, self._update_attempts + 1):
            lease = _CLAIM_LEASE_MS if attempt > _CLAIM_AFTER else 0
            calls = [self._store_call(group, token, lease, receipt) for group in pending]
            replies = await self._run(
                partial(self._eval_all, self._store_script, calls),
                "store subjects %r",
                _NamesOf(pending),
            )
            unstored: list[_Group] = []
            for group, reply in zip(pending, replies, strict=True):
                status = reply[0]
                if status == _CONFLICT:
                    _reapply(group, reply[1:])
                elif status == _ALREADY_COMMITTED:
                    fresh = False
                    continue
                if status != _STORED:
                    unstored.append(group)
            if not unstored:
                return fresh
            if any(reply[0] == _CLAIMED for reply in replies):
                waits += 1
                await _wait_for_claim(waits)
            pending = unstored
        raise UpdateConflictError(
            f"Callable updates of subjects {_NamesOf(pending)!r} lost to concurrent writers "
            f"{self._update_attempts} times in a row; nothing of those subjects was stored, and the "
            "contention on them needs lowering (or raise update_attempts)."
        )

    async def set(self, name: str, prop: str, value: str, *, ext: bool = False) -> tuple[bool, Any]:
        keys, args = [self.keys.subject(name)], [property_field(prop, ext), value]
        old = await self._run(lambda: self._eval(self._set_script, keys, args), "write subject %r", name)
        self._refresh_remembered((keys[0], args[0]), value)
        return (old is not None, decode(old) if old is not None else None)

    async def update(
        self, name: str, prop: str, fn: Callable[[Any], Any], *, ext: bool = False
    ) -> tuple[Any, Any, bool]:
        key, field = self.keys.subject(name), property_field(prop, ext)
        read = partial(self._run, partial(self._commands.hget, key, field), "update subject %r", name)
        # The first attempt bets on the value this storage last stored there, which saves the read
        # whenever nobody else wrote since.  A lost bet is a compare-and-set that failed, whose
        # reply carries the current value; a callable that fails on the bet gets a real read.
        remembered = (key, field)
        guessing = remembered in self._last_values
        raw = self._last_values.get(remembered) if guessing else await read()
        token = os.urandom(_TOKEN_BYTES).hex()
        attempt = waits = 0
        while attempt < self._update_attempts:
            old = decode(raw) if raw is not None else None
            try:
                new = fn(old)
                value = encode(new, name, prop)
            except Exception:
                if not guessing:
                    raise
                guessing = False
                raw = await read()
                continue
            if not guessing:
                attempt += 1
            lease = _CLAIM_LEASE_MS if attempt > _CLAIM_AFTER else 0
            # One subject, one check, one set, no delete (see lua/store.lua).
            args: list[Arg] = [token, WRITE_TOKENS_FIELD, _TOKENS_KEPT, CLAIM_FIELD, lease, *_NO_COMMIT]
            args += (1, 1, 0)
            args += (field, _text(raw) if raw is not None else "", field, value)
            reply = await self._run(
                partial(self._eval, self._store_script, [key], args), "update subject %r", name
            )
            guessing = False
            if reply[0] == _STORED:
                self._remember(remembered, value)
                return new, old, raw is not None
            if reply[0] == _CONFLICT:
                raw = reply[1][2]
            else:
                waits += 1
                await _wait_for_claim(waits)
        self._last_values.pop(remembered, None)
        raise UpdateConflictError(
            f"Updating property {prop!r} of subject {name!r} lost to concurrent writers "
            f"{self._update_attempts} times in a row; nothing was stored, and the contention on it "
            "needs lowering (or raise update_attempts)."
        )

    async def delete(self, name: str, prop: str, *, ext: bool = False) -> tuple[bool, Any]:
        keys, args = [self.keys.subject(name)], [property_field(prop, ext), WRITE_TOKENS_FIELD, CLAIM_FIELD]
        old = await self._run(
            lambda: self._eval(self._delete_script, keys, args), "delete from subject %r", name
        )
        self._refresh_remembered((keys[0], args[0]), None)
        return (old is not None, decode(old) if old is not None else None)

    async def flush(self, name: str) -> None:
        key = self.keys.subject(name)
        await self._run(partial(self._commands.delete, key), "flush subject %r", name)

    # -- lifecycle -----------------------------------------------------------------------------

    async def check(self) -> None:
        """Ping the server and load the scripts; raise a one-sentence error saying what is wrong."""

        async def ping_and_load() -> None:
            await self._commands.ping()
            await self._load_scripts()

        await self._run(ping_and_load, "ping and load scripts")

    async def close(self) -> None:
        """Close the connection this storage opened (a client passed in stays open)."""
        await self._commands.aclose()

    def __repr__(self) -> str:
        return f"RedisStorage(url={self.url!r}, keys={self.keys!r})"

    def with_partitions(self, partitions: int) -> RedisStorage:
        """This storage's connection and settings, for a deployment of ``partitions`` partitions."""
        return RedisStorage(
            self.commands,
            KeySchema(self.keys.prefix, partitions),
            url=self.url,
            retries=self._retries,
            retry_backoff=self._retry_backoff,
            retry_backoff_cap=self._retry_backoff_cap,
            update_attempts=self._update_attempts,
            dedupe_window=self.dedupe_window_ms / 1000,
        )

    async def run(self, op: Callable[[], Awaitable[_T]], action: str, *details: object) -> _T:
        """Run ``op`` (commands of this storage's connection) with this storage's retries and errors.

        ``action % details`` completes "could not ..." in an error message.
        """
        return await self._run(op, action, *details)

    # -- plumbing ------------------------------------------------------------------------------

    def _remember(self, remembered: tuple[str, str], value: str) -> None:
        """Keep the value an update stored, for the first bet of the next one (the latest 1,024)."""
        values = self._last_values
        values.pop(remembered, None)
        values[remembered] = value
        if len(values) > _VALUES_KEPT:
            del values[next(iter(values))]

    def _refresh_remembered(self, remembered: tuple[str, str], value: str | None) -> None:
        """Keep a remembered value in step with a plain write of this storage (None: deleted)."""
        if remembered in self._last_values:
            self._last_values[remembered] = value

    def _store_call(
        self, group: _Group, token: str, lease: int, receipt: StreamCommit | None
    ) -> tuple[list[str], list[Arg]]:
        """Return the keys and arguments of one store-script call (see ``redis_store.lua``)."""
        keys: list[str] = []
        commit: tuple[Arg, ...] = _NO_COMMIT
        if receipt is not None:
            partition = receipt.partition
            keys += (self.keys.processed(partition), self.keys.stream(partition))
            self._commits += 1
            window = self.dedupe_window_ms if self._commits % _TRIM_EVERY == 0 else 0
            commit = (receipt.event_id, receipt.entry_id, CONSUMER_GROUP, window)
        body: list[Any] = []
        any_checks = False
        for changes in group:
            keys.append(self.keys.subject(changes.name))
            checks: list[str] = []
            sets: list[str] = []
            dels: list[str] = []
            for field_prefix, mapping in (
                (PROPERTY_FIELD_PREFIX, changes.props),
                (EXTENDED_FIELD_PREFIX, changes.ext),
            ):
                for prop, change in mapping.items():
                    field = field_prefix + prop
                    if type(change) is str:
                        sets += (field, change)
                    elif change is DELETE:
                        dels.append(field)
                    elif isinstance(change, Update):
                        checks += (field, change.expected if change.expected is not None else "")
                        sets += (field, change.value)
            any_checks = any_checks or bool(checks)
            body += (len(checks) // 2, len(sets) // 2, len(dels), *checks, *sets, *dels)
        if not any_checks:
            token, lease = "", 0
        return keys, [token, WRITE_TOKENS_FIELD, _TOKENS_KEPT, CLAIM_FIELD, lease, *commit, *body]

    async def _eval(self, script: LuaScript, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        return await self._commands.evalsha(script.sha, keys, args)

    async def _eval_all(self, script: LuaScript, calls: list[tuple[list[str], list[Arg]]]) -> list[_Reply]:
        """Run ``script`` once per call, all in one round trip; raise the first error reply."""
        return await self._commands.evalsha_many(script.sha, calls)

    async def _load_scripts(self) -> None:
        await self._commands.load_scripts([script.source for script in self._scripts])
        self._scripts_missing = False

    async def _run(self, op: Callable[[], Awaitable[_T]], action: str, *details: object) -> _T:
        """Run ``op``, reloading scripts and retrying transient failures; translate driver errors.

        ``action % details`` completes "could not ..." in error messages; it is formatted only on
        failure, so the hot path builds no strings.
        """
        failures = 0
        reloads = 0
        started = time.monotonic()
        while True:
            try:
                if self._scripts_missing:
                    await self._load_scripts()
                return await op()
            except NoScriptError:
                reloads += 1
                if reloads > _SCRIPT_RELOADS:
                    raise StorageError(
                        f"Redis at {self.url} forgot krules' Lua scripts {reloads} times while trying to "
                        f"{action % details}; check that nothing runs SCRIPT FLUSH in a loop."
                    ) from None
                self._scripts_missing = True
            except NoPermissionError as exc:
                raise ConfigurationError(
                    f"Redis at {self.url} does not permit krules to {action % details} ({_reason(exc)}); "
                    "grant its user the hash, scripting and SCAN commands on the keys of its prefix."
                ) from None
            except _CREDENTIAL_ERRORS as exc:
                raise ConfigurationError(
                    f"Redis at {self.url} refused krules' credentials when asked to "
                    f"{action % details} ({_reason(exc)}); fix the user name or password in the Redis URL."
                ) from None
            except _TRANSIENT_ERRORS as exc:
                failures += 1
                if failures > self._retries:
                    raise StorageUnavailableError(
                        f"Redis at {self.url} could not {action % details} after {failures} attempts "
                        f"in {time.monotonic() - started:.1f} s ({_reason(exc)}); check that the server "
                        "is running and reachable at that address."
                    ) from None
                delay = min(self._retry_backoff_cap, self._retry_backoff * 2 ** (failures - 1))
                delay *= 0.5 + random.random() / 2
                _log.warning(
                    "Redis at %s failed (%s); retry %d of %d in %.2f s",
                    self.url,
                    _reason(exc),
                    failures,
                    self._retries,
                    delay,
                )
                await asyncio.sleep(delay)
            except RedisError as exc:
                raise StorageError(
                    f"Redis at {self.url} refused to {action % details}: {_reason(exc)}."
                ) from None


class _NamesOf:
    """The sorted subject names of some store groups, rendered only when a message needs them."""

    __slots__ = ("_groups",)

    def __init__(self, groups: list[_Group]) -> None:
        self._groups = groups

    def __repr__(self) -> str:
        return repr(sorted({changes.name for group in self._groups for changes in group}))


def _reapply(group: _Group, conflicts: list[Any]) -> None:
    """Re-apply the callables the store script reported stale: ``[[index, field, current, ...], ...]``."""
    for conflict in conflicts:
        changes = group[int(conflict[0]) - 1]
        for i in range(1, len(conflict), 2):
            field = _text(conflict[i])
            current = _text(conflict[i + 1]) if conflict[i + 1] is not None else None
            prop = field[2:]
            mapping: dict[str, Change] = (
                changes.ext if field.startswith(EXTENDED_FIELD_PREFIX) else changes.props
            )
            change = mapping[prop]
            if isinstance(change, Update):
                change.reapply(current, changes.name, prop)


async def _wait_for_claim(waits: int) -> None:
    """Pause while another writer's claim blocks a callable update: jittered, exponentially longer."""
    delay = min(_CLAIM_BACKOFF_CAP, _CLAIM_BACKOFF * 2 ** (waits - 1))
    await asyncio.sleep(delay * (0.5 + random.random() / 2))


def _require_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer of at least {minimum}, not {value!r}.")


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _reason(exc: Exception) -> str:
    """The driver's words for a failure, fit to sit inside one of our sentences."""
    text = " ".join(str(exc).split()).rstrip(".").replace(". ", ": ")
    return text or type(exc).__name__


def _redact(url: str) -> str:
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
