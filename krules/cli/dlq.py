"""``krules dlq list|show|replay|purge``: the dead letters of a Redis-mode deployment, read
straight from Redis (so it works whether or not an instance runs); without ``KRULES_REDIS_URL``
(embedded mode, dead letters in the instance's memory) or with ``--url``, ``list``, ``show`` and
``purge`` ask the running instance over HTTP (:mod:`krules.http.dead_letters`).

Times are taken as ISO 8601 (``2026-01-31T12:00:00Z``, UTC when no zone is given) or as a duration
ago (``90s``, ``15m``, ``2h``, ``7d``, ``1w``, ``1h30m``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from krules.cli.common import (
    UsageError,
    configure_quiet_logging,
    format_table,
    printable,
    redis_storage,
    require_redis,
    say,
    say_json,
    url_and_token,
)
from krules.config import Settings
from krules.container import settings_from_env
from krules.dead_letters.admin import DeadLetters
from krules.dead_letters.record import PREFIX, DeadLetter
from krules.errors import DeadLetterError, ReplayInFlightError
from krules.http.client import AsyncKRulesClient

if TYPE_CHECKING:
    from krules.transport.redis_streams import RedisStreams

__all__ = ["add_dlq_commands", "command_dlq", "parse_duration", "parse_time"]

_T = TypeVar("_T")

_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNIT_SECONDS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_ERROR_WIDTH: Final = 72


def parse_duration(raw: str, option: str) -> float:
    """Seconds in ``raw`` (``90``, ``90s``, ``15m``, ``2h``, ``7d``, ``1w``, ``1h30m``); a one-sentence
    usage error naming ``option`` otherwise."""
    text = raw.strip().lower().replace(" ", "")
    parts = _DURATION.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise UsageError(f"{option} {raw!r} is not a duration; use e.g. 90s, 15m, 2h, 7d or 1h30m.")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def parse_time(raw: str, option: str, now: float) -> float:
    """Epoch seconds of ``raw``: an ISO 8601 time (UTC when no zone is given) or a duration ago."""
    text = raw.strip()
    if text[:1].isdigit() and ("-" in text or "T" in text.upper()):
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise UsageError(
                f"{option} {raw!r} is not a time; give an ISO 8601 time such as 2026-01-31T12:00:00Z, "
                "or a duration ago such as 2h."
            ) from None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    return now - parse_duration(raw, option)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


_Names = list[str]  # module-level: inside the classes, "list" is the method


class _Store(Protocol):
    """What the commands use of :class:`DeadLetters` (which the instance's HTTP routes offer too)."""

    async def index(self) -> dict[str, float]: ...

    async def list(
        self,
        *,
        handler: str | None = None,
        event_type: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> Sequence[DeadLetter]: ...

    async def find(self, ident: str) -> DeadLetter: ...

    async def delete(self, name: str) -> bool: ...

    async def purge(self, older_than: float | None = None) -> _Names: ...


class _Remote:
    """A running instance's dead letters, over its ``/dead-letters`` routes (embedded mode)."""

    def __init__(self, client: AsyncKRulesClient) -> None:
        self.client = client

    async def index(self) -> dict[str, float]:
        return {record.name: record.failed_at for record in await self.list()}

    async def list(
        self,
        *,
        handler: str | None = None,
        event_type: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> Sequence[DeadLetter]:
        found = await self.client.dead_letters(
            handler=handler, type=event_type, reason=reason, since=since, until=until
        )
        return [DeadLetter.from_properties(str(record.get("name", "")), record) for record in found]

    async def find(self, ident: str) -> DeadLetter:
        record = await self.client.dead_letter(ident)
        return DeadLetter.from_properties(str(record.get("name", "")), record)

    async def delete(self, name: str) -> bool:
        return bool(await self.client.delete_dead_letters(name))

    async def purge(self, older_than: float | None = None) -> _Names:
        return await self.client.delete_dead_letters(older_than=older_than)


def _redis_mode(args: argparse.Namespace, settings: Settings) -> bool:
    """Redis mode reads the deployment's Redis; otherwise the commands ask the running instance."""
    return bool(settings.redis_url) and not getattr(args, "url", None)


def _where(args: argparse.Namespace, settings: Settings) -> str:
    if _redis_mode(args, settings):
        return f"under key prefix {settings.key_prefix!r}"
    return f"on {url_and_token(args, settings)[0]}"


async def _on_dead_letters(
    args: argparse.Namespace, settings: Settings, work: Callable[[_Store, RedisStreams | None], Awaitable[_T]]
) -> _T:
    """Run ``work`` on the dead letters: the deployment's, read from Redis (the partition count read
    there too), or the running instance's, over HTTP (embedded mode, or ``--url``)."""
    if not _redis_mode(args, settings):
        url, token = url_and_token(args, settings)
        async with AsyncKRulesClient(url, token) as client:
            return await work(_Remote(client), None)
    return await _on_deployment(settings, work)


async def _on_deployment(
    settings: Settings, work: Callable[[DeadLetters, RedisStreams], Awaitable[_T]]
) -> _T:
    """Run ``work`` on a Redis-mode deployment's dead letters and streams (the partition count read
    from Redis)."""
    from krules.transport.redis_streams import connect_streams

    storage = redis_storage(settings, retries=2)
    try:
        streams = await connect_streams(storage)
        return await work(DeadLetters(streams.storage), streams)
    finally:
        await storage.close()


def _dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    now = time.time()
    since = None if args.since is None else parse_time(args.since, "--since", now)
    until = None if args.until is None else parse_time(args.until, "--until", now)

    async def work(dead: _Store, streams: RedisStreams | None) -> Sequence[DeadLetter]:
        return await dead.list(
            handler=args.only_handler, event_type=args.type, reason=args.reason, since=since, until=until
        )

    records = asyncio.run(_on_dead_letters(args, settings, work))
    if args.json:
        say_json([r.to_dict() for r in records])
        return 0
    filtered = any(v is not None for v in (args.only_handler, args.type, args.reason, since, until))
    where = _where(args, settings)
    if not records:
        say(f"No dead letters{' match' if filtered else ''} {where}.")
        return 0
    say(f"{len(records)} dead letter(s) {where}{' matching' if filtered else ''}, oldest first")
    rows = [
        [
            r.id,
            _when(r.failed_at),
            r.reason,
            r.handler or "-",
            r.event_type or "-",
            r.subject or "-",
            r.attempts,
            r.replays,
            _clip(r.error_line, _ERROR_WIDTH) or "-",
        ]
        for r in records
    ]
    headers = ["ID", "FAILED AT (UTC)", "REASON", "HANDLER", "EVENT TYPE", "SUBJECT", "ATTEMPTS", "REPLAYS"]
    print(format_table([*headers, "ERROR"], rows))
    return 0


def _dlq_show(args: argparse.Namespace, settings: Settings) -> int:
    async def work(dead: _Store, streams: RedisStreams | None) -> DeadLetter:
        return await dead.find(args.id)

    record = asyncio.run(_on_dead_letters(args, settings, work))
    say_json(record.to_dict())
    return 0


def _dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    if bool(args.id) == bool(args.all):
        raise UsageError("Give either one dead letter ID or --all to 'krules dlq replay'.")
    if args.only_handler is not None and not args.all:
        raise UsageError("--handler selects among all dead letters; use it with --all, not with an ID.")
    refused: list[str] = []

    async def work(dead: DeadLetters, streams: RedisStreams) -> int:
        idents = [args.id] if args.id else [r.name for r in await dead.list(handler=args.only_handler)]
        replay_key = await streams.replay_key()  # the workers run only replays signed with it
        replayed = 0
        for ident in idents:
            try:
                record, event = await dead.replay(
                    ident, streams.send, replay_key=replay_key, force=args.force
                )
            except ReplayInFlightError as exc:  # idempotent: what was asked for is under way
                say(f"not replayed {ident.removeprefix(PREFIX)}: replay {exc.replay_id} is still in flight")
                continue
            except DeadLetterError as exc:
                if args.id:
                    raise
                refused.append(str(exc))
                continue
            replayed += 1
            target = f"handler {record.handler}" if record.handler else "every handler"
            say(
                f"replayed {record.id}: {record.event_type} for subject {record.subject!r} to {target} "
                f"as event {event.id}"
            )
        return replayed

    require_redis(settings, "dlq replay")
    replayed = asyncio.run(_on_deployment(settings, work))
    for reason in refused:
        say(f"krules: skipped: {reason}", err=True)
    if args.all and not replayed and not refused:
        say(f"No dead letters to replay under key prefix {settings.key_prefix!r}.")
    return 1 if refused else 0


def _confirm(what: str, yes: bool) -> bool:
    """Whether to delete ``what``: ``--yes``, or the operator says so (a usage error off a terminal)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"This would delete {what}; add --yes to delete them.")
    if input(f"Delete {printable(what)}? [y/N] ").strip().lower() in {"y", "yes"}:
        return True
    say("Nothing deleted.")
    return False


def _dlq_purge_one(args: argparse.Namespace, settings: Settings) -> int:
    if args.older_than is not None:
        raise UsageError("Give 'krules dlq purge' either one dead letter ID or --older-than, not both.")

    async def find(dead: _Store, streams: RedisStreams | None) -> DeadLetter:
        return await dead.find(args.id)

    record = asyncio.run(_on_dead_letters(args, settings, find))
    if not _confirm(f"dead letter {record.id} ({record.event_type or '-'} for {record.subject!r})", args.yes):
        return 0

    async def delete(dead: _Store, streams: RedisStreams | None) -> bool:
        return await dead.delete(record.name)

    deleted = asyncio.run(_on_dead_letters(args, settings, delete))
    say(f"Deleted dead letter {record.id}." if deleted else f"Dead letter {record.id} was already gone.")
    return 0


def _dlq_purge(args: argparse.Namespace, settings: Settings) -> int:
    if args.id is not None:
        return _dlq_purge_one(args, settings)
    older_than = None if args.older_than is None else parse_duration(args.older_than, "--older-than")
    age = "" if older_than is None else f" that failed more than {args.older_than} ago"

    async def count(dead: _Store, streams: RedisStreams | None) -> int:
        index = await dead.index()
        cutoff = None if older_than is None else time.time() - older_than
        return sum(1 for at in index.values() if cutoff is None or at < cutoff)

    if not args.yes:
        n = asyncio.run(_on_dead_letters(args, settings, count))
        if not n:
            say(f"No dead letters{age} {_where(args, settings)}.")
            return 0
        if not _confirm(f"{n} dead letter(s){age} {_where(args, settings)}", False):
            return 0

    async def purge(dead: _Store, streams: RedisStreams | None) -> list[str]:
        return await dead.purge(older_than)

    deleted = asyncio.run(_on_dead_letters(args, settings, purge))
    say(f"Deleted {len(deleted)} dead letter(s){age}.")
    return 0


_DLQ_COMMANDS: Final[dict[str, Callable[[argparse.Namespace, Settings], int]]] = {
    "list": _dlq_list,
    "show": _dlq_show,
    "replay": _dlq_replay,
    "purge": _dlq_purge,
}


def command_dlq(args: argparse.Namespace) -> int:
    """``krules dlq list|show|replay|purge``: the dead letters of a Redis-mode deployment, or (list,
    show, purge) of the running instance."""
    settings = settings_from_env()
    configure_quiet_logging(settings)
    return _DLQ_COMMANDS[args.dlq_command](args, settings)


def add_dlq_commands(commands: Any) -> None:
    """Register ``krules dlq`` and its subcommands on the ``krules`` subparsers ``commands``."""
    dlq = commands.add_parser(
        "dlq",
        help="list, show, replay and purge dead letters",
        description="The dead letters of a Redis-mode deployment (KRULES_REDIS_URL, KRULES_KEY_PREFIX): "
        "handler calls and stream entries that finally failed, stored as subjects dlq-<id>.",
    )
    sub = dlq.add_subparsers(dest="dlq_command", metavar="COMMAND")
    when = "ISO 8601 time (UTC unless zoned) or a duration ago, e.g. 2h"
    listing = sub.add_parser(
        "list", help="list dead letters, oldest first", description="List dead letters, oldest first."
    )
    # dest "handler" is taken: main() calls args.handler
    listing.add_argument(
        "--handler", dest="only_handler", metavar="H", help="only this handler (name or glob)"
    )
    listing.add_argument("--type", metavar="T", help="only this event type (or glob)")
    listing.add_argument("--reason", metavar="R", help="only this reason, e.g. error, timeout, circuit_open")
    listing.add_argument("--since", metavar="WHEN", help=f"failed at or after WHEN: {when}")
    listing.add_argument("--until", metavar="WHEN", help=f"failed before WHEN: {when}")
    listing.add_argument("--json", action="store_true", help="print JSON (every field) instead of a table")
    show = sub.add_parser(
        "show",
        help="print one dead letter as JSON",
        description="Print one dead letter as JSON: the original event, error, traceback and the rest.",
    )
    show.add_argument("id", metavar="ID", help="its id (or an unambiguous start of it)")
    replay = sub.add_parser(
        "replay",
        help="send dead letters' events again, to the handler that failed",
        description="Append each dead letter's original event to its partition's stream again, with a "
        "new id, for the handler that failed only; the dead letter is deleted once that handler succeeds. "
        "While a replay of a dead letter is in flight, replaying it again sends nothing (it is idempotent).",
    )
    replay.add_argument("id", metavar="ID", nargs="?", help="the dead letter to replay")
    replay.add_argument("--all", action="store_true", help="replay every dead letter (see --handler)")
    replay.add_argument(
        "--handler", dest="only_handler", metavar="H", help="with --all: only this handler's (name or glob)"
    )
    replay.add_argument(
        "--force",
        action="store_true",
        help="send a replay even while an earlier one is in flight (the handler may then run twice)",
    )
    purge = sub.add_parser(
        "purge",
        help="delete dead letters",
        description="Delete one dead letter (ID), or dead letters: all, or the old ones.",
    )
    purge.add_argument("id", metavar="ID", nargs="?", help="only this dead letter (or an unambiguous start)")
    purge.add_argument("--older-than", metavar="DURATION", help="only those older than this, e.g. 7d")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for parser in (listing, show, purge):
        parser.add_argument(
            "--url",
            help="a running instance's URL, to ask it instead of Redis (without KRULES_REDIS_URL: "
            "the one of KRULES_HTTP_HOST/KRULES_HTTP_PORT)",
        )
        parser.add_argument("--token", help="the instance's ingress token (default KRULES_INGRESS_TOKEN)")
    for parser, handler in ((listing, "list"), (show, "show"), (replay, "replay"), (purge, "purge")):
        parser.set_defaults(handler=command_dlq, dlq_command=handler)
