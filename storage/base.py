"""The subject storage protocol, the change batch it stores and the JSON codec of values.

A backend keeps, per subject, two maps of JSON-encoded values: ordinary properties and extended
properties.  The core hands it batches of :class:`SubjectChanges` built by cached subjects; each
change of a property is one of

* a JSON string: put this value;
* :data:`DELETE`: remove the property;
* an :class:`Update`: the result of a callable.  ``expected`` is the JSON the callable saw (``None``
  when the property was missing) and ``value`` the JSON it produced.  A backend writes ``value`` only
  if the stored JSON still equals ``expected``; otherwise it re-applies ``fn`` to the stored value,
  so that no concurrent increment is ever lost, and records what it wrote in ``value``.

Every backend must apply one subject's changes atomically and never half-apply a batch because a
value failed to encode (encoding happens before anything is written).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

__all__ = [
    "DELETE",
    "Change",
    "CommittingStorage",
    "Receipt",
    "SubjectChanges",
    "SubjectStorage",
    "Update",
    "decode",
    "encode",
]


class _Delete:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DELETE"


DELETE: Final = _Delete()


class Update:
    """A callable update waiting to be stored; see the module docstring."""

    __slots__ = ("expected", "fn", "value")

    def __init__(self, expected: str | None, fn: Callable[[Any], Any], value: str) -> None:
        self.expected = expected
        self.fn = fn
        self.value = value

    def reapply(self, current: str | None, subject: str, prop: str) -> str:
        """Apply ``fn`` again on the value another writer stored; return and remember the new JSON."""
        self.value = encode(self.fn(decode(current) if current is not None else None), subject, prop)
        self.expected = current
        return self.value

    def __repr__(self) -> str:
        return f"Update(expected={self.expected!r}, value={self.value!r})"


Change = str | _Delete | Update


@dataclass(slots=True)
class SubjectChanges:
    """The pending writes of one subject: ordinary and extended properties, keyed by name."""

    name: str
    props: dict[str, Change] = field(default_factory=dict)
    ext: dict[str, Change] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.props or self.ext)


_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_encode = _encoder.encode
_encode_string: Final = json.encoder.encode_basestring  # what the encoder uses for str (ensure_ascii off)
decode: Final = json.loads


def encode(value: Any, subject: str = "?", prop: str = "?") -> str:
    """Encode ``value`` as compact JSON, or raise :class:`ValueNotSerializableError` naming the property."""
    kind = value.__class__
    if kind is str:  # the usual property values, without the encoder's Python-level dispatch
        return _encode_string(value)
    if kind is int:
        return int.__repr__(value)
    try:
        return _encode(value)
    except (TypeError, ValueError) as exc:
        # Imported here, not at the top: the core imports this protocol module, so a top-level
        # import of the krules package from it would be a cycle when a backend is imported first.
        from krules.errors import ValueNotSerializableError

        raise ValueNotSerializableError(
            f"Property {prop!r} of subject {subject!r} got {value!r} ({type(value).__name__}), which is "
            f"not JSON-serialisable ({exc}); store strings, numbers, booleans, None, lists or dicts."
        ) from None


@runtime_checkable
class SubjectStorage(Protocol):
    """What the engine needs from a subject storage backend.

    All values crossing this protocol are already decoded Python values, except inside
    :class:`SubjectChanges`, which carries JSON.  ``ext`` selects extended properties.
    """

    async def load(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return ``(properties, extended_properties)`` of subject ``name`` (empty dicts if unknown)."""
        ...

    async def store(self, batch: Sequence[SubjectChanges]) -> None:
        """Apply the changes of several subjects; each subject's changes atomically."""
        ...

    async def get(self, name: str, prop: str, *, ext: bool = False) -> Any:
        """Return one stored property; raise ``KeyError`` when it does not exist."""
        ...

    async def set(self, name: str, prop: str, value: str, *, ext: bool = False) -> tuple[bool, Any]:
        """Store one JSON value now; return ``(existed, old_value)``."""
        ...

    async def update(
        self, name: str, prop: str, fn: Callable[[Any], Any], *, ext: bool = False
    ) -> tuple[Any, Any, bool]:
        """Atomically apply ``fn`` to the stored value (None when missing); return ``(new, old, existed)``."""
        ...

    async def delete(self, name: str, prop: str, *, ext: bool = False) -> tuple[bool, Any]:
        """Remove one property now; return ``(existed, old_value)``."""
        ...

    async def flush(self, name: str) -> None:
        """Remove the subject and all its properties."""
        ...

    async def subjects(self, prefix: str = "") -> list[str]:
        """Return the names of stored subjects that start with ``prefix``, sorted."""
        ...

    async def check(self) -> None:
        """Verify the storage is reachable; raise a :class:`~krules.errors.StorageError` saying why not."""
        ...

    async def close(self) -> None:
        """Release connections; the storage is not used afterwards."""
        ...


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where a turn's root event came from; committing the turn acknowledges it there."""

    partition: int
    """The partition whose stream delivered the event (the subject's partition)."""
    event_id: str
    """The event's id, recorded as processed by the commit."""
    entry_id: str = ""
    """The stream entry to acknowledge ('' when the event did not come from a stream)."""


@runtime_checkable
class CommittingStorage(SubjectStorage, Protocol):
    """A storage that can commit a turn: its writes, "event processed" and the acknowledgement, at once."""

    async def commit(self, batch: Sequence[SubjectChanges], receipt: Receipt) -> bool:
        """Store a turn's changes and mark ``receipt``'s event processed and acknowledged, atomically
        for the subjects of ``receipt.partition``; return False (writing nothing of that partition)
        when the event had been committed before."""
        ...
