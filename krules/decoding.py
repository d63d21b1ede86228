"""Strict decoding of event JSON: what krules refuses before an event is routed, and the limits.

One verdict wherever an event comes in or goes out: the HTTP ingress (a refused event is a ``400``),
the partition worker (a refused stream entry is dead-lettered as ``invalid_event``) and the Python
clients (a refused event raises before anything is sent).  Each refusal is an
:class:`~krules.errors.EventFormatError` with one sentence.  Refused are:

* text that is not UTF-8: bytes are never replaced, so two different byte strings cannot become
  one subject;
* a lone surrogate in any string (``"\\ud800"`` escaped in JSON, or in a Python ``str``): it is
  not Unicode text and cannot be stored or sent as UTF-8;
* an event larger than :data:`MAX_EVENT_BYTES` as JSON text;
* data nested deeper than :data:`MAX_NESTING` levels of arrays and objects (JSON nested 100,000
  deep would otherwise end in a ``RecursionError``);
* ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON.

The checks cost little on ordinary events: an ASCII ``str`` holds no surrogate; JSON text without
a ``\\u`` escape of one cannot produce one; text with fewer brackets than the depth limit cannot
nest deeper.  Only text that fails these tests is walked (iteratively: no depth makes it recurse).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

from krules.errors import EventFormatError

__all__ = ["MAX_EVENT_BYTES", "MAX_NESTING", "SURROGATE", "check_data", "check_text", "load_json", "shown"]

MAX_EVENT_BYTES: Final = 1 << 20
"""The largest event krules takes, as UTF-8 JSON text (1 MiB): a stream entry's ``event`` field,
a structured-mode request body, an event a client sends.  ``KRULES_INGRESS_MAX_BYTES`` (the
largest request body, which may hold a batch) defaults to it."""

MAX_NESTING: Final = 64
"""The deepest an event's data may nest, in arrays and objects (the data object is level 1)."""

_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
SURROGATE: Final = re.compile("[\ud800-\udfff]")
"""Matches a surrogate code point: in a ``str``, only a lone one can be (a pair is one character)."""
_SHOWN: Final = 40
_SHOWN_STEPS: Final = 6


def shown(value: str) -> str:
    """``repr`` of ``value``, cut to a readable length (for a sentence naming a long value)."""
    return repr(value) if len(value) <= _SHOWN else repr(value[:_SHOWN]) + "..."


def check_text(value: str, what: str, where: str = "") -> None:
    """EventFormatError when ``value`` holds a lone surrogate; ``what`` (and ``where`` in it) name it."""
    if value.isascii():
        return
    match = SURROGATE.search(value)
    if match is not None:
        at = f" at {where}" if where else ""
        raise EventFormatError(
            f"{what} holds a lone surrogate {match.group()!r} in {shown(value)}{at}, which is not "
            "Unicode text; send valid UTF-8."
        )


def _path(root: str, steps: list[Any]) -> str:
    more = "..." if len(steps) > _SHOWN_STEPS else ""
    return root + "".join(f"[{step!r}]" for step in steps[:_SHOWN_STEPS]) + more


def _walk(value: Any, levels: int, what: str, root: str, finite: bool) -> None:
    """Check every container and string in ``value``: no deeper than ``levels`` (``value`` itself,
    a container, is level 1), no lone surrogate, and with ``finite`` no NaN or infinity."""
    stack: list[tuple[Any, int, list[Any]]] = [(value, 1, [])]
    while stack:
        item, level, steps = stack.pop()
        if isinstance(item, str):
            check_text(item, what, _path(root, steps))
        elif isinstance(item, dict | list | tuple):  # a payload built in Python may hold tuples
            if level > levels:
                raise EventFormatError(
                    f"{what} nests arrays and objects deeper than an event's data may ({MAX_NESTING} "
                    f"levels, reached at {_path(root, steps)}); flatten it."
                )
            if isinstance(item, dict):
                for key, child in item.items():
                    if isinstance(key, str) and not key.isascii():
                        check_text(key, what, f"a key of {_path(root, steps)}")
                    stack.append((child, level + 1, [*steps, key]))
            else:
                stack += [(child, level + 1, [*steps, i]) for i, child in enumerate(item)]
        elif finite and isinstance(item, float) and not math.isfinite(item):
            raise EventFormatError(
                f"{what} holds {item!r} at {_path(root, steps)}, which is not JSON; send finite numbers."
            )


def check_data(data: Any, what: str = "The event's data", *, envelopes: int = 0, root: str = "data") -> None:
    """EventFormatError when ``data``, a payload built in Python, nests too deep or holds a lone
    surrogate or a non-finite number (a full walk: for clients, not for hot paths).  ``envelopes``
    and ``root``: as for :func:`load_json`, and how the sentence names ``data``."""
    _walk(data, MAX_NESTING + envelopes, what, root, True)


class _NotJson(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity``, met by the JSON parser."""


def _not_json(constant: str) -> Any:
    raise _NotJson(constant)


# One decoder, made once: json.loads with any keyword argument builds a new one (and its scanner) per
# call, which cost ~20,000 instructions per stream entry.
_decode: Final = json.JSONDecoder(parse_constant=_not_json).decode


def _check_size(size: int, max_bytes: int, what: str) -> None:
    if size > max_bytes:
        raise EventFormatError(
            f"{what} is {size} bytes, more than the {max_bytes} krules takes (an event may be "
            f"{MAX_EVENT_BYTES} bytes of JSON); send smaller events."
        )


def load_json(raw: str | bytes, what: str, *, max_bytes: int = MAX_EVENT_BYTES, envelopes: int = 1) -> Any:
    """Parse JSON text strictly (see the module docstring); EventFormatError naming ``what``.

    ``envelopes``: the levels of arrays and objects the text puts around an event's data (1 for an
    event, its object; 2 for a batch, the array too; 0 for bare data).  ``max_bytes``: the size
    limit of the text (a request body may be larger than one event).
    """
    if isinstance(raw, str):
        text = raw
        if len(text) > max_bytes // 4:  # only then may its UTF-8 be over the limit
            _check_size(len(text.encode("utf-8", "surrogatepass")), max_bytes, what)
        if not text.isascii():
            check_text(text, what)
    else:
        _check_size(len(raw), max_bytes, what)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            around = raw[max(0, exc.start - 8) : exc.start + 8]
            raise EventFormatError(
                f"{what} is not UTF-8 (byte {raw[exc.start]:#04x} at position {exc.start}, in "
                f"{around!r}); krules never replaces bytes, send UTF-8 text."
            ) from None
    try:
        obj = _decode(text)
    except json.JSONDecodeError as exc:
        raise EventFormatError(
            f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
        ) from None
    except RecursionError:
        raise EventFormatError(
            f"{what} nests arrays and objects far deeper than an event's data may ({MAX_NESTING} "
            "levels); flatten it."
        ) from None
    except _NotJson as exc:
        raise EventFormatError(
            f"{what} holds {exc.args[0]}, which is not JSON; send finite numbers."
        ) from None
    except ValueError as exc:  # an integer of more digits than Python converts (4,300)
        detail = str(exc).split(";", 1)[0].rstrip(".")
        raise EventFormatError(f"{what} holds a number krules cannot read ({detail}).") from None
    levels = MAX_NESTING + envelopes
    if text.count("[") + text.count("{") > levels or ("\\u" in text and _SURROGATE_ESCAPE.search(text)):
        _walk(obj, levels, what, "$", False)
    return obj
