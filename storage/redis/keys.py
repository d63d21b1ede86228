"""Every Redis key and hash field krules uses, and nothing else: the key schema lives here.

``<prefix>`` is the user's ``key_prefix`` (default ``krules:``); ``<p>`` is the partition of a
subject, ``crc32(utf8(name)) % partitions`` (:func:`krules.partitioning.partition_of`).

Keys::

    <prefix>{p<p>}:s:<subject>   hash    one subject: its properties, extended properties and metadata
    <prefix>{p<p>}:stream        stream  the partition's events, one entry per event (the entry format
                                         is :mod:`krules.transport.base`'s), read by the consumer group
                                         ``krules`` (:data:`CONSUMER_GROUP`)
    <prefix>{p<p>}:processed     zset    ids of the events the partition has committed, scored by commit
                                         time in ms, trimmed to the dedupe window
    <prefix>{p<p>}:lease         string  the partition's owner: ``<epoch>:<instance>:<nonce>``, expiring
                                         (``PX``) unless its owner renews it
                                         (:mod:`krules.transport.redis_leases`)
    <prefix>{p<p>}:fences        hash    partition number -> the epoch of its newest owner, as known in
                                         this partition's slot: a write made on behalf of a turn of
                                         partition ``q`` with an older epoch is refused here; field
                                         ``<p>`` itself is partition ``p``'s epoch counter
    <prefix>{p<p>}:timers        zset    the partition's pending timers (:mod:`krules.timers`): member
                                         ``<n>:<subject><key>`` (``n`` the subject's length in UTF-8
                                         bytes, :func:`timer_member`), scored by due time in ms
    <prefix>{p<p>}:timer-records hash    the same member -> the timer's event as a stream entry's JSON;
                                         written with a turn's commit, moved into the stream and
                                         removed (with the zset member) in one script by the owner
    <prefix>{p<p>}:timers-fired  hash    the same member -> the stream entry id of the timer's firing on
                                         its way (set by the script that moves it into the stream): the
                                         firing's turn runs only if it still finds its entry id here;
                                         a schedule or cancel of the member removes it (the firing is
                                         then stale), the firing's commit (or its entry's dead letter)
                                         removes it if it still holds that entry id
    <prefix>partitions           string  the partition count, recorded by the first instance started
    <prefix>instances            hash    instance name -> JSON ``{"partitions": [...], "seen": <ms>, ...}``,
                                         refreshed by each running instance with the server's clock
                                         (membership for partition assignment, ``krules partitions``)
    <prefix>replay-key           string  the deployment's replay key (64 hex digits): replays written
                                         to a stream are signed with it (:mod:`krules.dead_letters.signing`);
                                         created by the first instance or CLI that needs it

Dead letters are ordinary subjects, so they have no keys of their own: each is the hash of subject
``dlq-<id>``, and their index by time the hash of subject ``dlq-index`` (:mod:`krules.dead_letters`),
each in its own partition.  The names ``<prefix>{p<p>}:deadletter`` (a dead-letter stream that
earlier builds wrote) and ``<prefix>{p<p>}:dlq`` are reserved and not written.

Every key of partition ``p`` carries the Redis Cluster hash tag ``{p<p>}``: a cluster hashes only
the text between the first ``{`` and the next ``}``, so the subject hashes, the stream, the
processed-id set, the lease and the fences of one partition share a slot, and a turn's commit can be
one Lua script.  The tag ignores the prefix: partition ``p`` is in the same slot under every prefix.

``<prefix>partitions``, ``<prefix>instances`` and ``<prefix>replay-key`` carry no tag, deliberately:
each is read and written alone (never in one command or script with another key), so on a cluster
each lives in the slot of its full name, wherever that is; tagging them would change the names a
deployment already has.  Every command krules sends names keys of one slot only; on a cluster
(:mod:`storage.redis.cluster`) it is sent to that slot's primary.  This is
why the key prefix may not contain braces.  The subject name follows the tag verbatim (any string,
braces and colons included; the tag comes first, so the name never changes the slot).

Fields of a subject hash (values are compact JSON, see :func:`storage.base.encode`)::

    p:<name>   an ordinary property
    x:<name>   an extended property (kept apart: same name, different field)
    m:<name>   metadata, never a property:
      m:w      the tokens of the last callable updates written, newest first (fixed-width, see
               :mod:`storage.redis.batches`): a write retried after a lost reply is recognised, not
               re-applied
      m:c      a claim ``<token>:<expiry ms>`` by a writer that lost several compare-and-sets in a
               row; other callable updates of the subject wait until it is used or expires
      m:v      (reserved) the subject version a turn's commit will check

A subject hash that holds nothing but metadata is deleted, so a subject exists exactly as long as it
has a property.
"""

from __future__ import annotations

import re
from typing import Final

from krules.errors import ConfigurationError
from krules.partitioning import partition_of

__all__ = [
    "CLAIM_FIELD",
    "CONSUMER_GROUP",
    "EXTENDED_FIELD_PREFIX",
    "META_FIELD_PREFIX",
    "PROPERTY_FIELD_PREFIX",
    "VERSION_FIELD",
    "WRITE_TOKENS_FIELD",
    "KeySchema",
    "escape_glob",
    "lease_epoch",
    "lease_holder",
    "property_field",
    "timer_member",
    "timer_member_parts",
]

PROPERTY_FIELD_PREFIX: Final = "p:"
EXTENDED_FIELD_PREFIX: Final = "x:"
META_FIELD_PREFIX: Final = "m:"
WRITE_TOKENS_FIELD: Final = "m:w"
CLAIM_FIELD: Final = "m:c"
VERSION_FIELD: Final = "m:v"
CONSUMER_GROUP: Final = "krules"
"""The consumer group every partition stream is read by."""

_SUBJECT_MARK: Final = ":s:"
_GLOB_SPECIAL: Final = re.compile(r"([*?\[\]\\])")


def property_field(prop: str, ext: bool = False) -> str:
    """Return the hash field of property ``prop`` (an extended one when ``ext``)."""
    return (EXTENDED_FIELD_PREFIX if ext else PROPERTY_FIELD_PREFIX) + prop


def timer_member(subject: str, key: str) -> str:
    """The member naming timer ``key`` of ``subject`` in a partition's timer keys."""
    return f"{len(subject.encode())}:{subject}{key}"


def timer_member_parts(member: str) -> tuple[str, str]:
    """``(subject, key)`` of a :func:`timer_member`."""
    head, _, rest = member.partition(":")
    raw = rest.encode()
    size = int(head)
    return raw[:size].decode(), raw[size:].decode()


def lease_epoch(lease: str) -> int:
    """The epoch of a partition's lease ``<epoch>:<instance>:<nonce>``: its fencing token."""
    return int(lease.partition(":")[0])


def lease_holder(lease: str) -> str:
    """The instance named in a partition's lease ``<epoch>:<instance>:<nonce>`` (the name may hold
    colons; the epoch and the nonce do not)."""
    return lease.partition(":")[2].rpartition(":")[0]


def escape_glob(text: str) -> str:
    """Escape ``text`` for a Redis ``MATCH`` pattern, so that it matches only itself."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class KeySchema:
    """The key names of one krules deployment: a key prefix and a partition count."""

    __slots__ = ("_subject_heads", "partitions", "prefix")

    def __init__(self, prefix: str = "krules:", partitions: int = 1) -> None:
        if not isinstance(prefix, str):
            raise ConfigurationError(f"The Redis key prefix must be a string, not {prefix!r}.")
        if "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"The Redis key prefix {prefix!r} contains a brace; krules puts the Redis Cluster hash "
                "tag right after the prefix, so choose a prefix without '{' or '}' (e.g. 'krules:')."
            )
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ConfigurationError(
                f"The partition count must be a positive integer, not {partitions!r}; set "
                "KRULES_PARTITIONS to 1 or more."
            )
        self.prefix: Final = prefix
        self.partitions: Final = partitions
        self._subject_heads = tuple(f"{prefix}{{p{p}}}{_SUBJECT_MARK}" for p in range(partitions))

    def partition(self, subject: str) -> int:
        """Return the partition of ``subject``."""
        return partition_of(subject, self.partitions)

    def tag(self, partition: int) -> str:
        """Return the hash tag shared by every key of ``partition``."""
        return f"{{p{partition}}}"

    def subject(self, name: str) -> str:
        """Return the key of the hash holding subject ``name``."""
        return self._subject_heads[partition_of(name, self.partitions)] + name

    def subject_pattern(self, name_prefix: str = "") -> str:
        """Return a ``SCAN MATCH`` pattern covering the subjects whose names start with ``name_prefix``.

        The pattern may also match a few keys that are not such subjects (a ``*`` stands for the
        partition number); filter the results with :meth:`subject_name`.
        """
        return f"{escape_glob(self.prefix)}{{p*}}{_SUBJECT_MARK}{escape_glob(name_prefix)}*"

    def subject_name(self, key: str) -> str | None:
        """Return the subject name held in ``key``, or None when ``key`` is not a subject key."""
        prefix = self.prefix
        if not key.startswith(prefix) or not key.startswith("{p", len(prefix)):
            return None
        start = len(prefix) + 2
        end = key.find("}", start)
        number = key[start:end] if end >= 0 else ""
        if not (number.isascii() and number.isdigit()) or not key.startswith(_SUBJECT_MARK, end + 1):
            return None
        return key[end + 1 + len(_SUBJECT_MARK) :]

    def stream(self, partition: int) -> str:
        """Return the key of ``partition``'s event stream."""
        return f"{self.prefix}{{p{partition}}}:stream"

    def processed(self, partition: int) -> str:
        """Return the key of ``partition``'s processed-event-id set."""
        return f"{self.prefix}{{p{partition}}}:processed"

    def dead_letter_stream(self, partition: int) -> str:
        """Return the key of ``partition``'s dead-letter stream (reserved: no longer written)."""
        return f"{self.prefix}{{p{partition}}}:deadletter"

    def lease(self, partition: int) -> str:
        """Return the key of ``partition``'s ownership lease."""
        return f"{self.prefix}{{p{partition}}}:lease"

    def fences(self, partition: int) -> str:
        """Return the key of the owner epochs known in ``partition``'s slot (see the module docstring)."""
        return f"{self.prefix}{{p{partition}}}:fences"

    def timers(self, partition: int) -> str:
        """Return the key of ``partition``'s pending timers by due time."""
        return f"{self.prefix}{{p{partition}}}:timers"

    def timer_records(self, partition: int) -> str:
        """Return the key of ``partition``'s timer records (the events the timers become)."""
        return f"{self.prefix}{{p{partition}}}:timer-records"

    def timers_fired(self, partition: int) -> str:
        """Return the key of ``partition``'s fired-timer markers (the firings on their way)."""
        return f"{self.prefix}{{p{partition}}}:timers-fired"

    def instances(self) -> str:
        """Return the key of the hash of running instances and the partitions they own."""
        return f"{self.prefix}instances"

    def dead_letters(self, partition: int) -> str:
        """Return the key of ``partition``'s dead-letter index (reserved: the index is a subject)."""
        return f"{self.prefix}{{p{partition}}}:dlq"

    def replay_key(self) -> str:
        """Return the key holding the deployment's replay key (replays in streams are signed with it)."""
        return f"{self.prefix}replay-key"

    def partition_count(self) -> str:
        """Return the key recording the partition count of the deployment."""
        return f"{self.prefix}partitions"

    def __repr__(self) -> str:
        return f"KeySchema(prefix={self.prefix!r}, partitions={self.partitions})"
