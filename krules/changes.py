"""The change batch a turn hands to storage, and the JSON codec of property values.

A backend keeps, per subject, two maps of JSON-encoded values: ordinary properties and extended
properties.  Cached subjects collect their writes as :class:`SubjectChanges`; each change of a
property is one of

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from krules.errors import ValueNotSerializableError

__all__ = ["DELETE", "Change", "SubjectChanges", "Update", "decode", "encode"]


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
    """The pending writes of one subject: ordinary and extended properties, keyed by name, and
    its timer changes (``timers``: key -> a :class:`~krules.timers.Timer` to schedule, replacing
    any of that key, :data:`~krules.timers.CANCEL`, or :class:`~krules.timers.Fired` at the end of
    that key's firing; None, the usual case, for none)."""

    name: str
    props: dict[str, Change] = field(default_factory=dict)
    ext: dict[str, Change] = field(default_factory=dict)
    timers: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return bool(self.props or self.ext or self.timers)


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
        raise ValueNotSerializableError(
            f"Property {prop!r} of subject {subject!r} got {value!r} ({type(value).__name__}), which is "
            f"not JSON-serialisable ({exc}); store strings, numbers, booleans, None, lists or dicts."
        ) from None
