"""What the ``krules`` commands share: the usage error, logging configuration, opening the Redis
storage, table output, and the options naming an instance or requiring Redis mode.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from krules.config import Settings
from krules.errors import ConfigurationError

__all__ = [
    "JsonLogFormatter",
    "TextLogFormatter",
    "UsageError",
    "configure_logging",
    "configure_quiet_logging",
    "format_table",
    "printable",
    "recorded_partitions",
    "redis_storage",
    "require_redis",
    "say",
    "say_json",
    "url_and_token",
]


class UsageError(Exception):
    """A mistake in the command line itself (exit code 2)."""


# -- logging ---------------------------------------------------------------------------------------
_RECORD_ATTRIBUTES: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's coloured duplicate of the message
}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's extras and any error."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        text = json.dumps(line, default=str, ensure_ascii=False)  # one line: the C0 controls escaped
        return (
            text if text.isprintable() else "".join(c if c.isprintable() else _json_escape(c) for c in text)
        )


class TextLogFormatter(logging.Formatter):
    """``time level logger: message``, the message :func:`printable` (a subject name or event type
    from outside cannot break the line or send escape sequences to a terminal)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def configure_logging(settings: Settings) -> None:
    """Log to stderr at ``settings.log_level``, as text or (``log_json``) one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(TextLogFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    if settings.log_level != "DEBUG":
        # one line per HTTP request a rule makes would drown the engine's own lines
        for chatty in ("httpx", "httpcore"):
            logging.getLogger(chatty).setLevel(logging.WARNING)


def configure_quiet_logging(settings: Settings) -> None:
    """For one-shot commands: no log lines (their outcome is stdout or one error line), unless DEBUG."""
    if settings.log_level == "DEBUG":
        configure_logging(settings)
    else:
        logging.getLogger().addHandler(logging.NullHandler())  # keeps logging's last-resort handler quiet


# -- Redis mode and instances ----------------------------------------------------------------------
def redis_storage(settings: Settings, **options: Any) -> Any:
    """The deployment's storage, as :mod:`krules.assembly` opens it (``options``: e.g. ``retries=2``)."""
    from krules.assembly import open_storage

    return open_storage(settings, **options)


def require_redis(settings: Settings, command: str) -> str:
    if not settings.redis_url:
        raise ConfigurationError(
            f"'krules {command}' reads a Redis-mode deployment; set KRULES_REDIS_URL "
            "(e.g. redis://127.0.0.1:6379/0) and KRULES_KEY_PREFIX if it is not 'krules:'."
        )
    return settings.redis_url


def url_and_token(args: argparse.Namespace, settings: Settings) -> tuple[str, str | None]:
    from krules.http.client import default_url

    url: str = args.url or default_url(settings.http_host, settings.http_port)
    token: str | None = args.token if args.token is not None else settings.ingress_token
    return url, token


async def recorded_partitions(storage: Any) -> Any:
    """``storage`` for the partition count recorded in Redis (the one instances use to place each
    subject's key), or ``storage`` itself when no instance has recorded one yet."""
    from krules.transport.redis_streams import connect_streams

    try:
        return (await connect_streams(storage)).storage
    except ConfigurationError:  # no count recorded: nothing was stored by an instance either
        return storage


# -- output ----------------------------------------------------------------------------------------
# Everything a command prints may hold what others wrote (subject names, event types, error
# messages, consumer names): a newline in it would forge table rows, an escape sequence would reach
# the operator's terminal.  So every character str.isprintable() refuses is printed escaped.
_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    known = _ESCAPES.get(char)
    if known is not None:
        return known
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every non-printable character (controls, line breaks, escape sequences,
    bidirectional overrides...) written as its Python escape (``\\n``, ``\\x1b``, ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _json_escape(char: str) -> str:
    return json.dumps(char)[1:-1]  # \u009b, or a surrogate pair: still valid JSON


def say(line: object = "", *, err: bool = False) -> None:
    """Print one line, escaped (:func:`printable`): it can never become two lines."""
    print(printable(str(line)), file=sys.stderr if err else sys.stdout)


def say_json(value: Any) -> None:
    """Print ``value`` as indented JSON with every non-printable character as a JSON escape."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    # json.dumps escapes the C0 controls itself; what is left (C1 controls, bidirectional
    # overrides...) can only be inside strings, where a \u escape means the same.
    print(
        "\n".join(
            line if line.isprintable() else "".join(c if c.isprintable() else _json_escape(c) for c in line)
            for line in text.split("\n")
        )
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces (no trailing blanks), every cell :func:`printable`."""
    cells = [[printable(str(h)) for h in headers], *[[printable(str(c)) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )
