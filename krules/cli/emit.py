"""``krules emit``: send one event, to a running instance over HTTP or, in Redis mode, straight
to its partition's stream.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from krules.cli.common import UsageError, configure_quiet_logging, say, url_and_token
from krules.container import settings_from_env

__all__ = ["command_emit"]


def _json_object(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"The --data value {raw!r} is not valid JSON ({exc.msg} at column {exc.colno}); "
            "pass an object such as '{\"total\": 30}'."
        ) from None
    if not isinstance(value, dict):
        raise UsageError(f"The --data value must be a JSON object, not {type(value).__name__}: {raw!r}.")
    return value


def command_emit(args: argparse.Namespace) -> int:
    from krules.http.client import KRulesClient
    from krules.transport.stream_client import StreamClient

    data = _json_object(args.data) if args.data is not None else None
    settings = settings_from_env()
    configure_quiet_logging(settings)
    if settings.redis_url and not args.url:
        with StreamClient(settings.redis_url, settings.key_prefix) as streams:
            say(streams.emit(args.type, args.subject, data))
        return 0
    url, token = url_and_token(args, settings)
    with KRulesClient(url, token) as client:
        event_id = client.emit(args.type, args.subject, data)
    say(event_id)
    return 0
