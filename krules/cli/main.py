"""The ``krules`` command line: its argument parser and :func:`main`, the console script.

The commands are one module each: :mod:`~krules.cli.run`, :mod:`~krules.cli.emit`,
:mod:`~krules.cli.subjects`, :mod:`~krules.cli.partitions`, :mod:`~krules.cli.dlq` and
:mod:`~krules.cli.timers`.

Every mistake a user can make (a module that does not import, bad JSON, a bad ``KRULES_*`` value,
an unreachable instance or storage) ends as one line ``krules: error: <sentence>`` on stderr and a
non-zero exit: 2 for usage and configuration mistakes, 1 for runtime failures.  Never a traceback
(set ``KRULES_LOG_LEVEL=DEBUG`` to get one logged for ``krules run``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Final, NoReturn

from krules.cli.common import UsageError, printable
from krules.cli.dlq import add_dlq_commands
from krules.cli.emit import command_emit
from krules.cli.partitions import command_partitions
from krules.cli.run import command_run
from krules.cli.subjects import command_subject_show
from krules.cli.timers import add_timer_commands
from krules.errors import ConfigurationError, EventFormatError, KRulesError, RuleModuleError

__all__ = ["main"]

logger = logging.getLogger("krules.cli")  # its name before the re-layout, kept for logging configs

EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
_USAGE_ERRORS: Final = (ConfigurationError, RuleModuleError, EventFormatError)


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

    partitions_cmd = commands.add_parser(
        "partitions",
        help="show partitions, their owners, stream lengths, pending entries and lag",
        description="Show a Redis-mode deployment's partitions (KRULES_REDIS_URL, KRULES_KEY_PREFIX): "
        "which instances own them, stream length, pending entries and lag.",
    )
    partitions_cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
    partitions_cmd.set_defaults(handler=command_partitions)

    add_dlq_commands(commands)
    add_timer_commands(commands)
    return parser


def _fail(message: str, code: int) -> int:
    sentence = " ".join(message.split()) or "Failed without a reason."  # one line, whatever the source
    if not sentence.endswith((".", "!", "?")):
        sentence += "."
    print(f"krules: error: {printable(sentence)}", file=sys.stderr)
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
            if args.command == "timers":
                raise UsageError("Missing timers command; use 'krules timers list' or 'cancel SUBJECT KEY'.")
            if args.command == "dlq":
                raise UsageError(
                    "Missing dlq command; use 'krules dlq list', 'show ID', 'replay ID' or 'purge'."
                )
            raise UsageError(
                "Missing command; use one of run, emit, subject, partitions, dlq or timers "
                "(see 'krules --help')."
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
