"""``krules subject show``: print a subject's properties as JSON, read from Redis in Redis mode
(at the partition count the deployment recorded there, with its pending timers), otherwise from the
running instance.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from krules.cli.common import (
    configure_quiet_logging,
    recorded_partitions,
    redis_storage,
    say_json,
    url_and_token,
)
from krules.config import Settings
from krules.container import settings_from_env
from krules.errors import KRulesError

__all__ = ["command_subject_show"]


class _NotFound(KRulesError):
    """Raised when ``krules subject show`` finds nothing stored under the name (exit code 1)."""


def _show(
    name: str, props: dict[str, Any], ext: dict[str, Any], timers: list[dict[str, Any]] | None = None
) -> None:
    shown: dict[str, Any] = {"name": name, "properties": props, "ext": ext}
    if timers is not None:
        shown["timers"] = timers
    say_json(shown)


async def _load_from_redis(
    settings: Settings, name: str
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    storage = redis_storage(settings, retries=2)
    try:
        # the subject's key depends on the deployment's partition count, recorded in Redis
        recorded = await recorded_partitions(storage)
        props, ext = await recorded.load(name)
        timers = sorted(
            (t.describe() for t in await recorded.timers(name)), key=lambda t: (t["due"], t["key"])
        )
    finally:
        await storage.close()
    return props, ext, timers


def command_subject_show(args: argparse.Namespace) -> int:
    settings = settings_from_env()
    configure_quiet_logging(settings)
    if settings.redis_url and not args.url:
        props, ext, timers = asyncio.run(_load_from_redis(settings, args.name))
        if not props and not ext and not timers:
            raise _NotFound(
                f"Subject {args.name!r} is not stored in Redis (key prefix {settings.key_prefix!r})."
            )
        _show(args.name, props, ext, timers)
        return 0
    from krules.http.client import KRulesClient

    url, token = url_and_token(args, settings)
    with KRulesClient(url, token) as client:
        answer = client.subject(args.name)
    _show(str(answer.get("name", args.name)), answer.get("properties", {}), answer.get("ext", {}))
    return 0
