"""``krules emit``: send one event, to a running instance over HTTP or, in Redis mode, straight
to its partition's stream.
"""

from __future__ import annotations

import argparse
from typing import Any

from krules.cli.common import UsageError, configure_quiet_logging, say, url_and_token
from krules.container import settings_from_env
from krules.decoding import load_json, shown
from krules.errors import EventFormatError

__all__ = ["command_emit"]


def _json_object(raw: str) -> dict[str, Any]:
    try:
        value = load_json(raw, "The --data value", envelopes=0)  # strictly, as an instance would
    except EventFormatError as exc:
        raise UsageError(str(exc)) from None
    if not isinstance(value, dict):
        raise UsageError(f"The --data value must be a JSON object, not {type(value).__name__}: {shown(raw)}.")
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
