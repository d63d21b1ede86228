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
    "UsageError",
    "configure_logging",
    "configure_quiet_logging",
    "format_table",
    "redis_storage",
    "require_redis",
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
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """Log to stderr at ``settings.log_level``, as text or (``log_json``) one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
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
    try:
        from storage.redis import create_redis_storage
    except ImportError as exc:
        raise ConfigurationError(
            f"KRULES_REDIS_URL is set but the Redis storage cannot be imported ({exc}); "
            "install krules with its redis dependency or unset KRULES_REDIS_URL."
        ) from None
    return create_redis_storage(
        url=settings.redis_url,
        key_prefix=settings.key_prefix,
        partitions=settings.partitions,
        dedupe_window=float(settings.dedupe_window),
        **options,
    )


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


# -- output ----------------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces (no trailing blanks)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )
