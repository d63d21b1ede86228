"""``krules timers list|cancel``: a Redis-mode deployment's pending timers (:mod:`krules.timers`),
read and cancelled straight in Redis, so it works whether or not an instance runs.
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from typing import Any

from krules.cli.common import (
    UsageError,
    configure_quiet_logging,
    format_table,
    recorded_partitions,
    redis_storage,
    require_redis,
    say,
    say_json,
)
from krules.container import settings_from_env
from krules.errors import KRulesError
from krules.timers import check_key

__all__ = ["add_timer_commands", "parse_when"]


class _NoTimer(KRulesError):
    """Raised when ``krules timers cancel`` finds no such timer (exit code 1)."""


def parse_when(raw: str) -> float:
    """``--due-before``: an ISO 8601 time with a zone (``2030-01-01T00:00:00Z``), or ``+<seconds>``
    from now; seconds since the epoch."""
    text = raw.strip()
    if text.startswith("+"):
        try:
            return datetime.now(UTC).timestamp() + float(text[1:])
        except ValueError:
            pass
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            when = None
        if when is not None and when.tzinfo is not None:
            return when.timestamp()
    raise UsageError(
        f"The --due-before value {raw!r} is not a time; give an ISO 8601 time with a zone "
        "(e.g. 2030-01-01T00:00:00Z) or +SECONDS from now."
    )


def _row(timer: dict[str, Any]) -> dict[str, Any]:
    due = datetime.fromtimestamp(timer["due"], UTC).isoformat().replace("+00:00", "Z")
    return {**timer, "due": due}


async def _list(args: argparse.Namespace) -> list[dict[str, Any]]:
    settings = settings_from_env()
    require_redis(settings, "timers list")
    storage = await recorded_partitions(redis_storage(settings, retries=2))
    try:
        due_before = parse_when(args.due_before) if args.due_before else None
        if args.subject:
            found = [
                t for t in await storage.timers(args.subject) if due_before is None or t.due < due_before
            ]
            found.sort(key=lambda t: (t.due, t.key))
        else:
            found = await storage.all_timers(due_before, args.limit)
        return [_row(t.describe()) for t in found]
    finally:
        await storage.close()


def command_timers_list(args: argparse.Namespace) -> int:
    configure_quiet_logging(settings_from_env())
    rows = asyncio.run(_list(args))
    if args.json:
        say_json(rows)
        return 0
    if not rows:
        say("no pending timers")
        return 0
    say(
        format_table(
            ["DUE", "SUBJECT", "KEY", "TYPE"], [[r["due"], r["subject"], r["key"], r["type"]] for r in rows]
        )
    )
    return 0


async def _cancel(subject: str, key: str) -> bool:
    settings = settings_from_env()
    require_redis(settings, "timers cancel")
    storage = await recorded_partitions(redis_storage(settings, retries=2))
    try:
        cancelled: bool = await storage.cancel_timer(subject, key)
        return cancelled
    finally:
        await storage.close()


def command_timers_cancel(args: argparse.Namespace) -> int:
    configure_quiet_logging(settings_from_env())
    key = check_key(args.key)
    if not asyncio.run(_cancel(args.subject, key)):
        raise _NoTimer(f"Subject {args.subject!r} has no pending timer {key!r}.")
    say(f"cancelled timer {key!r} of subject {args.subject!r}")
    return 0


def add_timer_commands(commands: Any) -> None:
    """Add ``krules timers list|cancel`` to the parser's subcommands."""
    timers = commands.add_parser(
        "timers", help="list or cancel pending timers", description="Pending timers (Redis mode)."
    )
    sub = timers.add_subparsers(dest="timers_command", metavar="COMMAND")
    listing = sub.add_parser(
        "list", help="list pending timers, soonest first", description="List pending timers, soonest first."
    )
    listing.add_argument("--subject", help="only this subject's timers")
    listing.add_argument(
        "--due-before", metavar="WHEN", help="only timers due before WHEN (ISO 8601 with a zone, or +SECONDS)"
    )
    listing.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=command_timers_list)
    cancel = sub.add_parser(
        "cancel", help="cancel a subject's pending timer", description="Cancel a subject's pending timer."
    )
    cancel.add_argument("subject", metavar="SUBJECT")
    cancel.add_argument("key", metavar="KEY")
    cancel.set_defaults(handler=command_timers_cancel)
