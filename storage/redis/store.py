"""RedisStorage: the subject storage protocol on Redis hashes, written by atomic Lua scripts.

One hash per subject (the key layout is :mod:`storage.redis.keys`), JSON values.  Writes run the
scripts of ``lua/``, loaded once per server (on :meth:`RedisStorage.check`, or on the first
``NOSCRIPT`` reply, e.g. after a restart) and called with ``EVALSHA``; the store script's calls and
conflicts are :mod:`storage.redis.batches`', the retries and error messages
:mod:`storage.redis.errors`'.  Made by :func:`storage.redis.create_redis_storage`.  Round trips per
operation: ``docs/performance.md``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Final, Protocol, TypeVar

from redis.exceptions import NoScriptError, RedisError

from krules.errors import ConfigurationError, LeaseLostError, UpdateConflictError
from krules.timers import CANCEL, Timer, timer_from_entry
from storage.base import SubjectChanges, decode, encode
from storage.redis._resp_connection import Arg, Command
from storage.redis.batches import (
    ALREADY_COMMITTED,
    CLAIM_AFTER,
    CLAIM_LEASE_MS,
    CLAIMED,
    CONFLICT,
    FENCED,
    STORED,
    TOKEN_BYTES,
    Group,
    NamesOf,
    add_call,
    by_partition,
    reapply,
    store_call,
    store_header,
    wait_for_claim,
)
from storage.redis.commands import RedisCommands, text
from storage.redis.errors import (
    NOT_RETRIED,
    SCRIPT_RELOADS,
    TRANSIENT_ERRORS,
    NotReplicatedError,
    back_off,
    refused,
    scripts_lost,
    unavailable,
)
from storage.redis.keys import (
    CLAIM_FIELD,
    CONSUMER_GROUP,
    EXTENDED_FIELD_PREFIX,
    PROPERTY_FIELD_PREFIX,
    WRITE_TOKENS_FIELD,
    KeySchema,
    escape_glob,
    lease_epoch,
    property_field,
    timer_member,
    timer_member_parts,
)
from storage.redis.scripts import LuaScript, lua_script

__all__ = ["RedisStorage", "StreamCommit"]


class StreamCommit(Protocol):
    """What :meth:`RedisStorage.commit` records with a turn's writes: the partition whose subjects
    they are, the event id marked processed, the stream entry acknowledged ('' for none), and the
    partition's lease as its owner held it when the entry was read ('' for no fence)."""

    @property
    def partition(self) -> int: ...
    @property
    def event_id(self) -> str: ...
    @property
    def entry_id(self) -> str: ...
    @property
    def fence(self) -> str: ...


_T = TypeVar("_T")

_SCAN_COUNT: Final = 1000
_VALUES_KEPT: Final = 1024  # (subject, property) pairs whose last stored value update() remembers
_TRIM_EVERY: Final = 256  # commits between two trims of a partition's processed-id set

_Reply = list[Any]


class RedisStorage:
    """Subjects as Redis hashes (see the module docstring), written atomically per partition.

    Limits: a batch spanning partitions is stored partition by partition (on a Redis Cluster they
    live in different slots).  Plain ``set``/``delete`` calls retried after a lost reply are applied
    again, which is harmless for the stored value, but the old value they report may then be their
    own first write.
    """

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
        partitions_given: bool = True,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        """``partitions_given``: whether ``keys``' partition count was asked for (it must then be the
        recorded one) or is a placeholder for the count the deployment recorded.  ``wait_replicas``:
        replicas that must acknowledge each store-script write (a commit run, a batch of stores)
        within ``wait_timeout_ms`` before it is reported done (0: none asked, no ``WAIT`` sent)."""
        self.keys = keys
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
        self._scripts: tuple[LuaScript, ...] = (self._store_script, self._set_script, self._delete_script)
        self._scripts_missing = False
        self._last_values: dict[tuple[str, str], str | None] = {}
        self._commits = 0
        self._partitions_given = partitions_given
        self._commit_keys: dict[int, tuple[str, str, str]] = {}  # partition -> a commit's header keys
        self._runs: dict[tuple[int, str], _CommitRun] = {}  # (partition, fence) -> commits to send
        self._layout_known = False
        self.wait_replicas: Final = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms

    # -- reads ---------------------------------------------------------------------------------

    async def load(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        if not self._layout_known:
            await self.layout(record=False)
        key = self.keys.subject(name)
        try:  # the first try directly: the retry loop only when it fails (see _run)
            stored = await self._commands.hgetall(key)
        except Exception:
            stored = await self._run(partial(self._commands.hgetall, key), "load subject %r", name)
        props: dict[str, Any] = {}
        ext: dict[str, Any] = {}
        for raw_field, raw_value in stored.items():
            field = text(raw_field)
            if field.startswith(PROPERTY_FIELD_PREFIX):
                props[field[2:]] = decode(raw_value)
            elif field.startswith(EXTENDED_FIELD_PREFIX):
                ext[field[2:]] = decode(raw_value)
        return props, ext

    async def get(self, name: str, prop: str, *, ext: bool = False) -> Any:
        if not self._layout_known:
            await self.layout(record=False)
        key, field = self.keys.subject(name), property_field(prop, ext)
        raw = await self._run(partial(self._commands.hget, key, field), "read subject %r", name)
        if raw is None:
            raise KeyError(prop)
        return decode(raw)

    async def subjects(self, prefix: str = "") -> list[str]:
        if not self._layout_known:
            await self.layout(record=False)
        pattern = self.keys.subject_pattern(prefix)

        async def scan() -> set[str]:
            found: set[str] = set()
            cursor = 0
            while True:
                cursor, page = await self._commands.scan(cursor, pattern, _SCAN_COUNT)
                for raw_key in page:
                    name = self.keys.subject_name(text(raw_key))
                    if name is not None and name.startswith(prefix):
                        found.add(name)
                if cursor == 0:
                    return found

        return sorted(await self._run(scan, "list subjects starting with %r", prefix))

    # -- timers (krules.timers) ----------------------------------------------------------------

    async def timers(self, name: str) -> list[Timer]:
        """The pending timers of subject ``name`` (one ``HSCAN`` of its partition's timer records)."""
        if not self._layout_known:
            await self.layout(record=False)
        records = self.keys.timer_records(self.keys.partition(name))
        pattern = escape_glob(timer_member(name, "")) + "*"

        async def scan() -> list[Timer]:
            found: list[Timer] = []
            cursor = 0
            while True:
                cursor, flat = await self._commands.execute(
                    "HSCAN", records, cursor, "MATCH", pattern, "COUNT", _SCAN_COUNT
                )
                cursor = int(cursor)
                for i in range(0, len(flat), 2):
                    if timer_member_parts(text(flat[i]))[0] == name:
                        found.append(timer_from_entry(text(flat[i + 1])))
                if cursor == 0:
                    return found

        return await self._run(scan, "list the timers of subject %r", name)

    async def all_timers(self, due_before: float | None = None, limit: int = 1000) -> list[Timer]:
        """Pending timers of every partition due before ``due_before`` (seconds since the epoch;
        None: any time), the soonest first, at most ``limit``."""
        if not self._layout_known:
            await self.layout(record=False)
        keys = self.keys
        until = "+inf" if due_before is None else f"({int(due_before * 1000)}"
        commands: list[Command] = [
            ("ZRANGEBYSCORE", keys.timers(p), "-inf", until, "LIMIT", 0, limit)
            for p in range(keys.partitions)
        ]
        members = await self._run(partial(self._commands.execute_many, commands), "list the timers")
        reads: list[Command] = [
            ("HMGET", keys.timer_records(p), *found) for p, found in enumerate(members) if found
        ]
        records = (
            await self._run(partial(self._commands.execute_many, reads), "read the timers") if reads else []
        )
        found = [timer_from_entry(text(r)) for rows in records for r in rows if r is not None]
        return sorted(found, key=lambda t: (t.due, t.subject, t.key))[:limit]

    async def cancel_timer(self, name: str, key: str) -> bool:
        """Cancel subject ``name``'s timer ``key`` now, pending or fired and not yet run (its firing
        then runs nothing); False when there was none."""
        if not self._layout_known:
            await self.layout()
        partition, member = self.keys.partition(name), timer_member(name, key)
        commands: list[Command] = [
            ("HEXISTS", self.keys.timer_records(partition), member),
            ("HEXISTS", self.keys.timers_fired(partition), member),
        ]
        exists = await self._run(
            partial(self._commands.execute_many, commands), "read timer %r of subject %r", key, name
        )
        await self.store([SubjectChanges(name, timers={key: CANCEL})])
        return any(int(found) for found in exists)

    async def fired_timer(self, name: str, key: str) -> str | None:
        """The stream entry id of subject ``name``'s timer ``key`` fired and on its way (moved into
        its partition's stream, its turn not yet committed); None when there is none: it was
        cancelled or scheduled again since, or its turn is over."""
        raw = await self._run(
            partial(
                self._commands.hget,
                self.keys.timers_fired(self.keys.partition(name)),
                timer_member(name, key),
            ),
            "read fired timer %r of subject %r",
            key,
            name,
        )
        return None if raw is None else text(raw)

    # -- writes --------------------------------------------------------------------------------

    async def store(self, batch: Sequence[SubjectChanges]) -> None:
        if not self._layout_known:
            await self.layout()
        pending = list(by_partition(self.keys, batch).values())
        if pending:
            await self._store_groups(pending, os.urandom(TOKEN_BYTES).hex(), None)

    async def commit(self, batch: Sequence[SubjectChanges], receipt: StreamCommit) -> bool:
        """Commit a turn; False when the event was committed before.

        One store-script call with a commit header: if the partition's processed-id set already
        holds the event id it only acknowledges the stream entry; otherwise it writes the changes,
        adds the id (scored by commit time, trimmed to the dedupe window now and then) and
        acknowledges the entry, all at once.  Writes the turn made to subjects of other partitions
        are stored first, with a write token derived from the event id, so a turn re-run after a
        crash does not apply their callable updates twice.

        With a fence (the receipt's lease), the commit is refused unless the partition's lease is
        still that one, and the writes to other partitions unless no newer owner of the partition
        has started: :class:`~krules.errors.LeaseLostError`, nothing of the refused part written.
        """
        if not self._layout_known:
            await self.layout()
        groups = by_partition(self.keys, batch)
        own = groups.pop(receipt.partition, [])
        if groups:
            # Stored before the commit, with a token that is the same when the turn is re-run.
            token = hashlib.blake2b(receipt.event_id.encode(), digest_size=TOKEN_BYTES).hexdigest()
            fence = f"{receipt.partition}:{lease_epoch(receipt.fence)}" if receipt.fence else ""
            await self._store_groups(list(groups.values()), token, None, fence, receipt)
        return await self._store_groups([own], os.urandom(TOKEN_BYTES).hex(), receipt)

    async def _store_groups(
        self,
        pending: list[Group],
        token: str,
        receipt: StreamCommit | None,
        fence: str = "",
        on_behalf_of: StreamCommit | None = None,
    ) -> bool:
        """Store each group (one partition's changes) with the store script, retrying conflicts
        (:mod:`storage.redis.batches`) up to ``update_attempts`` times, then UpdateConflictError.

        With a ``receipt`` (a commit: one group, the receipt's partition's), the first try joins the
        other commits of the partition made in the same event-loop iteration: one script run for
        all, each still checked and applied on its own (:meth:`_queue_commit`); a commit whose
        compare-and-set failed, or whose run failed, is tried again alone.  ``fence``
        (``<partition>:<epoch>``, plain stores only) is checked in each group's slot."""
        keys = self.keys
        waits = 0
        fresh = True
        for attempt in range(1, self._update_attempts + 1):
            lease = CLAIM_LEASE_MS if attempt > CLAIM_AFTER else 0
            replies: list[_Reply] | None = None
            if receipt is not None:  # a commit: one group, its partition's
                if attempt == 1 and not self._scripts_missing:
                    try:
                        replies = [await self._queue_commit(receipt, pending[0], token)]
                    except Exception:  # tried again below, with the retries
                        replies = None
                if replies is None:
                    calls = [self._commit_call(receipt, pending[0], token, lease)]
            else:
                calls = [store_call(keys, group, token, lease, fence) for group in pending]
                if not self._scripts_missing:
                    try:  # the first try directly: the retry loop only when it fails (see _run)
                        replies = [run[0] for run in await self._store_calls(calls)]
                    except Exception:
                        replies = None
            if replies is None:
                runs = await self._run(
                    partial(self._store_calls, calls), "store subjects %r", NamesOf(pending)
                )
                replies = [run[0] for run in runs]
            unstored: list[Group] = []
            for group, reply in zip(pending, replies, strict=True):
                status = reply[0]
                if status == FENCED:
                    raise _lease_lost(receipt or on_behalf_of, NamesOf([group]))
                if status == CONFLICT:
                    reapply(group, reply[1:])
                elif status == ALREADY_COMMITTED:
                    fresh = False
                    continue
                if status != STORED:
                    unstored.append(group)
            if not unstored:
                return fresh
            if any(reply[0] == CLAIMED for reply in replies):
                waits += 1
                await wait_for_claim(waits)
            pending = unstored
        raise UpdateConflictError(
            f"Callable updates of subjects {NamesOf(pending)!r} lost to concurrent writers "
            f"{self._update_attempts} times in a row; nothing of those subjects was stored, and the "
            "contention on them needs lowering (or raise update_attempts)."
        )

    def _commit_head(self, partition: int) -> tuple[str, str, str]:
        """The keys every commit of ``partition`` starts with: processed ids, stream, lease."""
        head = self._commit_keys.get(partition)
        if head is None:
            keys = self.keys
            head = self._commit_keys[partition] = (
                keys.processed(partition),
                keys.stream(partition),
                keys.lease(partition),
            )
        return head

    def _trim_window(self) -> int:
        """The dedupe window for a commit to trim the processed ids to: now and then, else 0."""
        self._commits += 1
        return self.dedupe_window_ms if self._commits % _TRIM_EVERY == 0 else 0

    def _commit_call(
        self, receipt: StreamCommit, group: Group, token: str, lease: int
    ) -> tuple[list[str], list[Arg]]:
        """A store-script run of one commit (a retry, or a first try after a failed run)."""
        call_keys = list(self._commit_head(receipt.partition))
        call_args = store_header(CONSUMER_GROUP, self._trim_window(), receipt.fence)
        add_call(self.keys, group, token, lease, receipt.event_id, receipt.entry_id, call_keys, call_args)
        return call_keys, call_args

    def _queue_commit(self, receipt: StreamCommit, group: Group, token: str) -> asyncio.Future[_Reply]:
        """Add a commit to the run of its partition sent at the end of this event-loop iteration
        (:meth:`_send_run`); the future is the commit's own reply."""
        where = (receipt.partition, receipt.fence)
        run = self._runs.get(where)
        loop = asyncio.get_running_loop()
        if run is None:
            run = self._runs[where] = _CommitRun(self._commit_head(receipt.partition), receipt.fence)
            loop.call_soon(self._send_run, where)
        window = self._trim_window()
        if window:
            run.args[4] = window
        add_call(self.keys, group, token, 0, receipt.event_id, receipt.entry_id, run.keys, run.args)
        run.args[6] += 1  # type: ignore[operator]
        reply: asyncio.Future[_Reply] = loop.create_future()
        run.waiting.append(reply)
        return reply

    def _send_run(self, where: tuple[int, str]) -> None:
        run = self._runs.pop(where)
        if self.wait_replicas:
            sent = asyncio.ensure_future(self._store_replicated(run.keys, run.args))
        else:
            sent = asyncio.ensure_future(self._commands.evalsha(self._store_script.sha, run.keys, run.args))
        sent.add_done_callback(run.hand_out)

    def _store_calls(self, calls: list[tuple[list[str], list[Arg]]]) -> Awaitable[list[_Reply]]:
        """Run the store script once per call (see :meth:`_eval_all`), each followed by its ``WAIT``
        when replicas are asked for."""
        if not self.wait_replicas:
            return self._eval_all(self._store_script, calls)
        return asyncio.gather(*(self._store_replicated(keys, args) for keys, args in calls))

    async def _store_replicated(self, keys: list[str], args: list[Arg]) -> Any:
        """One store-script run and its ``WAIT``; NotReplicatedError (retried by :meth:`_run`) when
        fewer than ``wait_replicas`` replicas acknowledged it in time."""
        wanted = self.wait_replicas
        reply, acknowledged = await self._commands.evalsha_replicated(
            self._store_script.sha, keys, args, wanted, self._wait_timeout_ms
        )
        if acknowledged < wanted:
            raise NotReplicatedError(acknowledged, wanted, self._wait_timeout_ms)
        return reply

    async def set(self, name: str, prop: str, value: str, *, ext: bool = False) -> tuple[bool, Any]:
        if not self._layout_known:
            await self.layout()
        keys, args = [self.keys.subject(name)], [property_field(prop, ext), value]
        old = await self._run(lambda: self._eval(self._set_script, keys, args), "write subject %r", name)
        self._refresh_remembered((keys[0], args[0]), value)
        return (old is not None, decode(old) if old is not None else None)

    async def update(
        self, name: str, prop: str, fn: Callable[[Any], Any], *, ext: bool = False
    ) -> tuple[Any, Any, bool]:
        if not self._layout_known:
            await self.layout()
        key, field = self.keys.subject(name), property_field(prop, ext)
        read = partial(self._run, partial(self._commands.hget, key, field), "update subject %r", name)
        # The first attempt bets on the value this storage last stored there, which saves the read
        # whenever nobody else wrote since.  A lost bet is a compare-and-set that failed, whose
        # reply carries the current value; a callable that fails on the bet gets a real read.
        remembered = (key, field)
        guessing = remembered in self._last_values
        raw = self._last_values.get(remembered) if guessing else await read()
        token = os.urandom(TOKEN_BYTES).hex()
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
            lease = CLAIM_LEASE_MS if attempt > CLAIM_AFTER else 0
            # One call of one subject, one check, one set, no delete (see lua/store.lua).
            args = store_header()
            args += (token, lease, "", "", 1, 1, 1, 0)
            args += (field, text(raw) if raw is not None else "", field, value)
            (reply,) = await self._run(
                partial(self._eval, self._store_script, [key], args), "update subject %r", name
            )
            guessing = False
            if reply[0] == STORED:
                self._remember(remembered, value)
                return new, old, raw is not None
            if reply[0] == CONFLICT:
                raw = reply[1][2]
            else:
                waits += 1
                await wait_for_claim(waits)
        self._last_values.pop(remembered, None)
        raise UpdateConflictError(
            f"Updating property {prop!r} of subject {name!r} lost to concurrent writers "
            f"{self._update_attempts} times in a row; nothing was stored, and the contention on it "
            "needs lowering (or raise update_attempts)."
        )

    async def delete(self, name: str, prop: str, *, ext: bool = False) -> tuple[bool, Any]:
        if not self._layout_known:
            await self.layout()
        keys, args = [self.keys.subject(name)], [property_field(prop, ext), WRITE_TOKENS_FIELD, CLAIM_FIELD]
        old = await self._run(
            lambda: self._eval(self._delete_script, keys, args), "delete from subject %r", name
        )
        self._refresh_remembered((keys[0], args[0]), None)
        return (old is not None, decode(old) if old is not None else None)

    async def flush(self, name: str) -> None:
        if not self._layout_known:
            await self.layout()
        key = self.keys.subject(name)
        await self._run(partial(self._commands.delete, key), "flush subject %r", name)

    # -- layout --------------------------------------------------------------------------------

    async def recorded_partitions(self) -> int | None:
        """The partition count recorded under this storage's key prefix (None: none yet)."""
        raw = await self._run(
            partial(self._commands.execute, "GET", self.keys.partition_count()), "read the partition count"
        )
        return None if raw is None else int(text(raw))

    async def layout(self, *, record: bool = True) -> KeySchema:
        """Settle the partition count on the one the deployment recorded, and return the keys.

        Done once, before the first read or write: subject keys depend on the count, so a storage
        never reads nor writes the keys of another layout.  A count asked for that differs from the
        recorded one is refused (ConfigurationError).  When nothing is recorded, the first writer
        records its count (the one asked for, or 1): a write records it (``record``), a read uses it
        without recording (and asks again next time)."""
        wanted = self.keys.partitions if self._partitions_given else None
        key = self.keys.partition_count()
        if record:
            commands: list[Command] = [("SET", key, wanted or 1, "NX"), ("GET", key)]
            replies = await self._run(
                partial(self._commands.execute_many, commands), "record the partition count"
            )
            recorded: int | None = int(text(replies[1]))
        else:
            recorded = await self.recorded_partitions()
        if recorded is None:
            return self.keys
        if wanted is not None and recorded != wanted:
            raise ConfigurationError(
                f"The krules deployment under key prefix {self.keys.prefix!r} has {recorded} partitions, "
                f"but this storage was opened with partitions={wanted}; open it with partitions={recorded}, "
                "or leave partitions out to use the recorded count."
            )
        if recorded != self.keys.partitions:
            self.keys = KeySchema(self.keys.prefix, recorded)
            self._commit_keys.clear()
        self._layout_known = True
        return self.keys

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

    def script(self, name: str) -> LuaScript:
        """The script ``lua/<name>.lua``, loaded with this storage's own (again after a ``NOSCRIPT``
        reply), for the transport's commands on this storage's connection."""
        found = lua_script(name)
        if found not in self._scripts:
            self._scripts = (*self._scripts, found)
            self._scripts_missing = True
        return found

    async def execute_replicated(self, commands: Sequence[Command]) -> list[Any]:
        """``commands`` in one round trip (per node), then, with ``wait_replicas``, a ``WAIT`` on each
        connection they went to: NotReplicatedError (retried by :meth:`run`) when fewer replicas
        acknowledged them in time.  For the transport's appends, so that an event accepted is not
        lost in a failover either."""
        wanted = self.wait_replicas
        if not wanted:
            return await self._commands.execute_many(commands)
        replies, acknowledged = await self._commands.execute_many_replicated(
            commands, wanted, self._wait_timeout_ms
        )
        if acknowledged < wanted:
            raise NotReplicatedError(acknowledged, wanted, self._wait_timeout_ms)
        return replies

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

        The hottest calls (a turn's load and its commit) try once without this loop and come here
        only when that try fails, so that the usual call costs no retry bookkeeping: the failed try
        then counts as none of the retries, and a command the server refused is sent once more
        before its error is raised (harmless: nothing a refused command does is applied).

        ``action % details`` completes "could not ..." in error messages; it is formatted only on
        failure, so the hot path builds no strings.  Which errors are retried, how long it waits and
        what it raises: :mod:`storage.redis.errors`.
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
                if reloads > SCRIPT_RELOADS:
                    raise scripts_lost(self.url, reloads, action % details) from None
                self._scripts_missing = True
            except NOT_RETRIED as exc:
                raise refused(exc, self.url, action % details) from None
            except TRANSIENT_ERRORS as exc:
                failures += 1
                if failures > self._retries:
                    raise unavailable(exc, self.url, action % details, failures, started) from None
                await back_off(
                    exc, self.url, failures, self._retries, self._retry_backoff, self._retry_backoff_cap
                )
            except RedisError as exc:
                raise refused(exc, self.url, action % details) from None


class _CommitRun:
    """Commits of one partition under one fence, waiting to be sent as one store-script run."""

    __slots__ = ("args", "keys", "waiting")

    def __init__(self, head: tuple[str, str, str], fence: str) -> None:
        self.keys = list(head)
        self.args = store_header(CONSUMER_GROUP, 0, fence, 0)
        self.waiting: list[asyncio.Future[_Reply]] = []

    def hand_out(self, sent: asyncio.Future[Any]) -> None:
        """Give each commit its reply, or the run's error (then each is tried again on its own)."""
        error = None if sent.cancelled() else sent.exception()
        for i, waiting in enumerate(self.waiting):
            if waiting.done():  # its turn was cancelled
                continue
            if sent.cancelled():
                waiting.cancel()
            elif error is not None:
                waiting.set_exception(error)
            else:
                waiting.set_result(sent.result()[i])


def _lease_lost(receipt: StreamCommit | None, names: NamesOf) -> LeaseLostError:
    if receipt is None:  # not reached: only a fenced call is refused
        return LeaseLostError(f"Writing subjects {names!r} was refused by a fence.", -1)
    return LeaseLostError(
        f"Partition {receipt.partition}'s lease is no longer this instance's, so the turn of event "
        f"{receipt.event_id!r} was not stored (subjects {names!r}); the partition's new owner runs it.",
        receipt.partition,
    )
