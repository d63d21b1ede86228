"""Replay authentication: only ``krules dlq replay`` can have a partition run a replay.

A replay is an event carrying ``krulesreplay`` (the one handler to run) and ``krulesdlq`` (the dead
letter it replays, deleted when the handler succeeds): whoever can write them can run one handler
alone and delete a subject.  The HTTP ingress and the Python clients refuse every ``krules*``
extension; a partition stream, which any service may ``XADD`` to, cannot refuse by sender, so the
worker accepts a replay only with ``krulesreplaysig``: an HMAC-SHA256, by the deployment's **replay
key**, over the event's id, type and subject, the handler and the dead letter it names.

The replay key is 32 random bytes (hex) kept under ``<prefix>replay-key`` (:mod:`storage.redis.keys`),
created by the first instance or CLI that needs it (``SET NX``).  The signature binds the replay
to its target: it cannot be moved to another handler, dead letter, subject or event id, and an
entry replayed twice has the same id (the partition drops the second).  A producer that may only
``XADD`` to the streams (a Redis ACL such as ``+xadd ~<prefix>{p*}:stream``) cannot read the key,
so it cannot forge a replay; anyone who can read every key can, as they could write any subject.

What the worker does with a stream entry carrying ``krules*`` extensions (:func:`entry_problem`):
``krulesdepth`` is accepted (the engine writes it on events it sends to other partitions; it only
shortens the event's own cascade), so is a string ``krulestimer`` (a due timer the partition's
owner moved into the stream; the engine runs it only if the partition's fired-timer marker names
its entry, so one written by hand runs nothing and is only acknowledged: see
:meth:`krules.engine.Engine.process`), a correctly signed replay is run, anything else (an unsigned or
wrongly signed replay, an unknown ``krules*`` extension) becomes a dead letter with reason
``reserved_extension``, committed with the entry's ack.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

from krules.events import (
    DEAD_LETTER_EXTENSION,
    DEPTH_EXTENSION,
    REPLAY_EXTENSION,
    REPLAY_SIGNATURE_EXTENSION,
    Event,
)
from krules.timers import TIMER_EXTENSION
from krules.validation import RESERVED_PREFIX

__all__ = ["entry_problem", "new_replay_key", "sign_replay"]

_REPLAY_PARTS: Final = frozenset({REPLAY_EXTENSION, DEAD_LETTER_EXTENSION, REPLAY_SIGNATURE_EXTENSION})


def new_replay_key() -> str:
    """A fresh replay key: 32 random bytes as hex."""
    return secrets.token_hex(32)


def _digest(key: str, event: Event, handler: str, dead_letter: str) -> str:
    message = "\x1f".join((event.id, event.type, event.subject, handler, dead_letter))
    return hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()


def sign_replay(key: str, event: Event) -> None:
    """Add ``krulesreplaysig`` to a replay ``event`` (one with ``krulesreplay`` and ``krulesdlq``)."""
    extensions = event.extensions or {}
    handler, dead_letter = extensions.get(REPLAY_EXTENSION), extensions.get(DEAD_LETTER_EXTENSION)
    if not isinstance(handler, str) or not isinstance(dead_letter, str):
        raise ValueError(f"Event {event.id!r} is not a replay: it names no handler and dead letter.")
    event.extensions = {**extensions, REPLAY_SIGNATURE_EXTENSION: _digest(key, event, handler, dead_letter)}


def entry_problem(event: Event, key: str | None) -> str | None:
    """Why a stream entry's ``event`` may not run (one sentence), or None; ``key`` is the
    deployment's replay key (None: there is none yet, so no replay can be valid)."""
    extensions = event.extensions
    if not extensions:
        return None
    reserved = [name for name in extensions if name.startswith(RESERVED_PREFIX)]
    if not reserved:
        return None
    if TIMER_EXTENSION in extensions:  # a due timer the partition's owner moved into the stream
        if not isinstance(extensions[TIMER_EXTENSION], str):
            return f"Event {event.id!r} carries a {TIMER_EXTENSION} extension that is not a timer key."
        reserved.remove(TIMER_EXTENSION)
        if not reserved:
            return None
    unknown = [name for name in reserved if name not in _REPLAY_PARTS]
    if unknown:
        return (
            f"Event {event.id!r} carries the extension {unknown[0]!r}; extensions named {RESERVED_PREFIX}* "
            f"are the krules engine's own (only {DEPTH_EXTENSION}, {TIMER_EXTENSION} and a signed replay "
            "may be in a stream)."
        )
    handler = extensions.get(REPLAY_EXTENSION)
    dead_letter = extensions.get(DEAD_LETTER_EXTENSION)
    signature = extensions.get(REPLAY_SIGNATURE_EXTENSION)
    if not (isinstance(handler, str) and isinstance(dead_letter, str) and isinstance(signature, str)):
        return (
            f"Event {event.id!r} carries {', '.join(sorted(reserved))} without a complete signed replay "
            f"({REPLAY_EXTENSION}, {DEAD_LETTER_EXTENSION} and {REPLAY_SIGNATURE_EXTENSION}); replays are "
            "sent by 'krules dlq replay'."
        )
    if key is None or not hmac.compare_digest(signature, _digest(key, event, handler, dead_letter)):
        return (
            f"Event {event.id!r} is a replay whose {REPLAY_SIGNATURE_EXTENSION} is not this deployment's "
            "signature; replays are sent by 'krules dlq replay'."
        )
    return None
