"""The ``krules`` command line: ``run`` rule modules, ``emit`` an event, ``subject show`` a subject,
``partitions`` (see :mod:`krules.cli.ops` for the operators' commands).

With ``KRULES_REDIS_URL`` set, ``krules run`` is an instance of a Redis-mode deployment: it reads
the partitions of ``KRULES_PARTITION_ID`` from their streams, and its HTTP ingress (like
``krules emit``) appends events to the streams.

Every mistake a user can make (a module that does not import, bad JSON, a bad ``KRULES_*`` value,
an unreachable instance or storage) ends as one line ``krules: error: <sentence>`` on stderr and a
non-zero exit: 2 for usage and configuration mistakes, 1 for runtime failures.  Never a traceback
(set ``KRULES_LOG_LEVEL=DEBUG`` to get one logged for ``krules run``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NoReturn

from dependency_injector import providers

from krules.app import default_container, use_container
from krules.config import Settings
from krules.engine import Engine
from krules.errors import (
    ConfigurationError,
    EventFormatError,
    KRulesError,
    RuleModuleError,
    StorageError,
)
from krules.events import Event
from krules.loader import load_rule_module
from middleware.registry import MIDDLEWARE_SETTINGS, build_default_chain

if TYPE_CHECKING:
    from krules.http.server import KRulesServer

__all__ = ["main"]

logger = logging.getLogger("krules.cli")  # its name before the re-layout, kept for logging configs

EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
_USAGE_ERRORS: Final = (ConfigurationError, RuleModuleError, EventFormatError)


class UsageError(Exception):
    """A mistake in the command line itself (exit code 2)."""


class _NotFound(KRulesError):
    """Raised when ``krules subject show`` finds nothing stored under the name (exit code 1)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one sentence, reported by :func:`main` like any other."""

    def error(self, message: str) -> NoReturn:
        sentence = message[:1].upper() + message[1:]
        raise UsageError(f"{sentence.rstrip('.')} (see '{self.prog} --help').")


def _port(raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port number between 0 and 65535")
    return port


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


# -- krules run ------------------------------------------------------------------------------------
def redis_storage(settings: Settings, **options: Any) -> Any:
    try:
        from storage.redis.store import create_redis_storage
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


class _Json:
    """Formats a payload as compact JSON only if the log line is emitted."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return json.dumps(self.value, default=str, ensure_ascii=False, separators=(",", ":"))


def log_event(event: Event) -> None:
    """An engine event observer: one INFO line per dispatched event, indented by cascade depth."""
    logger.info(
        "%s%s %s %s (id %s)",
        "  " * min(event.depth, 20),
        event.type,
        event.subject,
        _Json(event.data),
        event.id,
    )


def demo_events(url: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Sample events for ``--demo`` (``url`` is the instance's own, for an API call that succeeds)."""
    return [
        ("order.submitted", "order-1001", {"total": 30, "customer": "ada", "items": ["book"]}),
        ("order.submitted", "order-1002", {"total": 120.5, "customer": "grace", "items": ["lamp", "desk"]}),
        ("order.submitted", "order-1003", {"total": -5, "customer": "eve"}),  # invalid: rejected
        ("sensor.reading", "sensor-kitchen", {"value": 21.5}),
        ("sensor.reading", "sensor-kitchen", {"value": 22.0}),
        ("sensor.reading", "sensor-garage", {"value": "hot"}),  # not a number: a handler failure
        ("user.profile_update", "user-ada", {"name": "Ada", "email": "ada@example.com", "address": "London"}),
        ("api.call", "healthz-api", {"url": f"{url}/healthz"}),
        ("api.call", "missing-api", {"url": f"{url}/no-such-page"}),  # 404: fails without retrying
        ("loops.set", "muted-demo", {"color": "red", "size": 3}),
        ("loops.set", "filtered-demo", {"color": "blue"}),
        ("loops.set", "ext-demo", {"color": "green"}),
        ("device.reading", "device-7", {"value": 0.42}),
    ]


async def feed_demo(engine: Engine, server: KRulesServer) -> None:
    """Process the sample events the loaded rules handle, one after another, in-process."""
    samples = [s for s in demo_events(server.url) if engine.registry.match(s[0])]
    if not samples:
        logger.warning("demo: the loaded modules have no rules for the sample events; nothing fed")
        return
    logger.info("demo: feeding %d sample events", len(samples))
    for event_type, subject, data in samples:
        event = engine.new_event(event_type, subject, data)
        if engine.transport is not None:  # Redis mode: queued; the partitions' owners log them
            await asyncio.shield(engine.transport.send([event]))
            continue
        try:
            # shielded: a shutdown stops the feeding, but lets the turn under way finish
            turn = await asyncio.shield(engine.process(event))
        except StorageError as exc:
            logger.error("demo: %s for %r was not stored: %s", event_type, subject, exc)
            continue
        if turn.failures:
            logger.info(
                "demo: %s for %r finished with %d failed handler(s)", event_type, subject, len(turn.failures)
            )
    logger.info("demo: done; still serving on %s (try: krules subject show %s)", server.url, samples[0][1])


def command_run(args: argparse.Namespace) -> int:
    from krules.http.server import run

    settings = Settings.from_env(extra=MIDDLEWARE_SETTINGS, http_host=args.host, http_port=args.port)
    configure_logging(settings)
    container = default_container()
    container.settings.override(providers.Object(settings))
    storage = redis_storage(settings) if settings.redis_url else None
    if storage is not None:
        container.subject_storage.override(providers.Object(storage))
    chain = build_default_chain(settings)
    registry = container.registry()
    for mw in chain.middlewares:
        registry.add_middleware(mw)
    with use_container(container):
        for module in args.modules:
            load_rule_module(module)
            logger.info("loaded rule module %s", module)
    logger.info("middleware: %s", " -> ".join(chain.names) or "none")
    engine: Engine = container.engine()
    routes = []
    if chain.metrics is not None:
        from middleware.metrics import metrics_route

        engine.event_observers.append(chain.metrics.observe_event)
        routes.append(metrics_route(chain.metrics))
    companions: list[Callable[[KRulesServer], Any]] = []
    if storage is not None:
        from krules.transport.redis_streams import stream_worker

        worker = stream_worker(engine, storage)
        if chain.metrics is not None:
            metrics = chain.metrics

            def export(partition: int, lag: int | None, pending: int) -> None:
                if lag is not None:
                    metrics.record_partition_lag(partition, lag)
                metrics.record_partition_pending(partition, pending)

            worker.partition_observers.append(export)
            worker.dead_letter_observers.append(metrics.record_dead_letter)
        companions.append(lambda server: worker.run())
    if args.demo:
        engine.event_observers.append(log_event)
        companions.append(lambda server: feed_demo(engine, server))

    async def alongside(server: KRulesServer) -> None:
        await asyncio.gather(*(start(server) for start in companions))

    def on_started(server: KRulesServer) -> Any:
        return alongside(server) if companions else None

    try:
        run(engine, on_started=on_started, routes=routes)
    finally:
        if chain.tracer_provider is not None:
            chain.tracer_provider.shutdown()  # flushes the spans still buffered
    return 0


# -- krules emit / subject show --------------------------------------------------------------------
def _instance(args: argparse.Namespace, settings: Settings) -> tuple[str, str | None]:
    from krules.http.client import default_url

    url: str = args.url or default_url(settings.http_host, settings.http_port)
    token: str | None = args.token if args.token is not None else settings.ingress_token
    return url, token


def command_emit(args: argparse.Namespace) -> int:
    from krules.http.client import KRulesClient, StreamClient

    data = _json_object(args.data) if args.data is not None else None
    settings = Settings.from_env(extra=MIDDLEWARE_SETTINGS)
    configure_quiet_logging(settings)
    if settings.redis_url and not args.url:
        with StreamClient(settings.redis_url, settings.key_prefix) as streams:
            print(streams.emit(args.type, args.subject, data))
        return 0
    url, token = _instance(args, settings)
    with KRulesClient(url, token) as client:
        event_id = client.emit(args.type, args.subject, data)
    print(event_id)
    return 0


def _show(name: str, props: dict[str, Any], ext: dict[str, Any]) -> None:
    print(
        json.dumps({"name": name, "properties": props, "ext": ext}, indent=2, ensure_ascii=False, default=str)
    )


async def _load_from_redis(settings: Settings, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    storage = redis_storage(settings, retries=2)
    try:
        props, ext = await storage.load(name)
    finally:
        await storage.close()
    return props, ext


def command_subject_show(args: argparse.Namespace) -> int:
    settings = Settings.from_env(extra=MIDDLEWARE_SETTINGS)
    configure_quiet_logging(settings)
    if settings.redis_url and not args.url:
        props, ext = asyncio.run(_load_from_redis(settings, args.name))
        if not props and not ext:
            raise _NotFound(
                f"Subject {args.name!r} is not stored in Redis (key prefix {settings.key_prefix!r})."
            )
        _show(args.name, props, ext)
        return 0
    from krules.http.client import KRulesClient

    url, token = _instance(args, settings)
    with KRulesClient(url, token) as client:
        answer = client.subject(args.name)
    _show(str(answer.get("name", args.name)), answer.get("properties", {}), answer.get("ext", {}))
    return 0


# -- parser and entry point ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``krules`` argument parser."""
    from krules import __version__

    parser = _Parser(prog="krules", description="A reactive event-rule engine with subjects.")
    parser.add_argument("--version", action="version", version=f"krules {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run_cmd = commands.add_parser(
        "run",
        help="import rule modules and serve the HTTP ingress",
        description="Import rule modules (dotted names or .py paths) and serve events until SIGTERM/SIGINT.",
    )
    run_cmd.add_argument("modules", nargs="+", metavar="MODULE", help="rule module, e.g. rulesets.orders")
    run_cmd.add_argument("--host", help="address to listen on (KRULES_HTTP_HOST, default 127.0.0.1)")
    run_cmd.add_argument("--port", type=_port, help="port to listen on (KRULES_HTTP_PORT, default 8080)")
    run_cmd.add_argument("--demo", action="store_true", help="feed sample events once serving, and log them")
    run_cmd.set_defaults(handler=command_run)

    connection = _Parser(add_help=False)
    connection.add_argument(
        "--url", help="the instance's URL (default from KRULES_HTTP_HOST/KRULES_HTTP_PORT)"
    )
    connection.add_argument("--token", help="the ingress token (default KRULES_INGRESS_TOKEN)")

    emit_cmd = commands.add_parser(
        "emit",
        parents=[connection],
        help="send one event to a running instance",
        description="Send one event.",
    )
    emit_cmd.add_argument("type", metavar="TYPE", help="event type, e.g. order.submitted")
    emit_cmd.add_argument("subject", metavar="SUBJECT", help="subject name, e.g. order-1")
    emit_cmd.add_argument("--data", metavar="JSON", help="payload, a JSON object")
    emit_cmd.set_defaults(handler=command_emit)

    subject_cmd = commands.add_parser("subject", help="inspect subjects", description="Inspect subjects.")
    subject_commands = subject_cmd.add_subparsers(dest="subject_command", metavar="COMMAND")
    show = subject_commands.add_parser(
        "show",
        parents=[connection],
        help="print a subject's properties as JSON",
        description="Print a subject's properties as JSON: read from Redis when KRULES_REDIS_URL is set "
        "(and no --url is given), otherwise from the running instance.",
    )
    show.add_argument("name", metavar="NAME", help="subject name")
    show.set_defaults(handler=command_subject_show)

    from krules.cli.ops import command_partitions

    partitions_cmd = commands.add_parser(
        "partitions",
        help="show partitions, their owners, stream lengths, pending entries and lag",
        description="Show a Redis-mode deployment's partitions (KRULES_REDIS_URL, KRULES_KEY_PREFIX): "
        "which instances own them, stream length, pending entries and lag.",
    )
    partitions_cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
    partitions_cmd.set_defaults(handler=command_partitions)

    from krules.cli.ops import add_dlq_commands

    add_dlq_commands(commands)
    return parser


def _fail(message: str, code: int) -> int:
    sentence = " ".join(message.split()) or "Failed without a reason."  # one line, whatever the source
    if not sentence.endswith((".", "!", "?")):
        sentence += "."
    print(f"krules: error: {sentence}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``krules`` command line; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
        if handler is None:
            if args.command == "subject":
                raise UsageError("Missing subject command; use 'krules subject show NAME'.")
            if args.command == "dlq":
                raise UsageError(
                    "Missing dlq command; use 'krules dlq list', 'show ID', 'replay ID' or 'purge'."
                )
            raise UsageError(
                "Missing command; use one of run, emit, subject, partitions or dlq (see 'krules --help')."
            )
        return handler(args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except _USAGE_ERRORS as exc:
        logger.debug("usage error", exc_info=exc)
        return _fail(str(exc), EXIT_USAGE)
    except KRulesError as exc:
        logger.debug("runtime error", exc_info=exc)
        return _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into head: the reader has all it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at interpreter exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
