"""Logging middleware: one structured line per handler call.

Each handler call wrapped by :class:`LoggingMiddleware` logs one line with the event's id, type
and subject, the handler, the subject's partition, the outcome and the duration in milliseconds
(one line, wrapped here)::

    event_id=ev-1 event_type=order.submitted subject='order-1' handler=rules.validate partition=0
    outcome=ok duration_ms=0.412

Outcomes (:func:`~middleware.base.outcome_of`; a cancelled call logs no line): ``ok``; ``skipped``
(the call raised :class:`~middleware.base.SkipEvent`); ``failed`` (any other exception, re-raised
unchanged); ``dead_lettered`` (:class:`~middleware.base.DeadLetterEvent`, whose ``reason`` is
added).  ``failed`` and ``dead_lettered`` lines are logged at WARNING (or the
configured level if it is higher) with the error's type and message (its ``repr``, so the line
stays one line) but no traceback: the engine already logs one.  When a retry middleware inside
this one recorded :data:`~middleware.base.ATTEMPTS`, the line says how many attempts were made
(registered inside the retry middleware instead, it logs one line per attempt).

Options (keyword-only; a bad value raises :class:`~krules.errors.ConfigurationError`):

- ``logger``: a logger name or :class:`logging.Logger` (default ``"krules.handlers"``).
- ``level``: a level name (``"INFO"``, case-insensitive) or a positive int (default INFO).
- ``json``: log each line as one JSON object instead of ``key=value`` text (default False).
- ``partitions``: how many partitions subjects are spread over, to compute each line's partition
  with :func:`krules.partitioning.partition_of` (an int >= 1, default 1).

The lines are lazy: when the logger is not enabled for ``level``, a call costs one
``isEnabledFor`` check and nothing else (no clock read, no string or dict), and no line is logged
for it, failures included (the engine logs those anyway).  Text lines use ``%``-style arguments;
JSON lines also carry their fields as ``extra=`` record attributes, so a JSON formatter (such as
``krules run``'s) can use them as fields.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

from krules.config import EnvSettings, log_level, setting
from krules.errors import ConfigurationError
from krules.partitioning import partition_of
from middleware._log_record import record_maker
from middleware.base import ATTEMPTS, CANCELLED, OK, SKIPPED, DeadLetterEvent, Observer, Outcome, outcome_of

if TYPE_CHECKING:
    from krules.context import EventContext
    from middleware.registry import ChainBuild

__all__ = ["DEFAULT_LOGGER", "LoggingMiddleware", "LoggingSettings", "from_settings"]

_log = logging.getLogger(__name__)

# Built once: json.dumps with options builds a new encoder per call.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)

DEFAULT_LOGGER: Final = "krules.handlers"
"""The logger :class:`LoggingMiddleware` writes to unless told otherwise."""

_LINE: Final = "event_id=%s event_type=%s subject=%r handler=%s partition=%d outcome=%s duration_ms=%.3f"
# Every shape of line, built once at import: (attempts recorded?, error?, dead letter?) -> format.
_FORMATS: Final = {
    (attempts, error, dead): _LINE
    + (" attempts=%d" if attempts else "")
    + (" error=%r" if error else "")
    + (" reason=%s" if dead else "")
    for attempts in (False, True)
    for error in (False, True)
    for dead in (False, True)
}


# The lines' records are made by _record, as logging would make them but without its per-record
# work (see middleware._log_record), unless a record factory or a Logger subclass asks for their own.
_record: Final = record_maker(__file__)
_LogRecord: Final = logging.LogRecord


def _check_logger(logger: Any) -> logging.Logger:
    if isinstance(logger, logging.Logger):
        return logger
    if isinstance(logger, str) and logger.strip():
        return logging.getLogger(logger)
    raise ConfigurationError(
        f"LoggingMiddleware option logger={logger!r} is invalid; pass a logger name or a logging.Logger."
    )


def _check_level(level: Any) -> int:
    if isinstance(level, str):
        number = logging.getLevelNamesMapping().get(level.strip().upper())
        if number:  # NOTSET (0) would log nothing useful
            return number
    elif isinstance(level, int) and not isinstance(level, bool) and level > 0:
        return level
    raise ConfigurationError(
        f"LoggingMiddleware option level={level!r} is invalid; pass a level name such as 'INFO' "
        "or a positive integer such as logging.INFO."
    )


def _check_json(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"LoggingMiddleware option json={value!r} is invalid; pass True or False.")
    return value


def _check_partitions(partitions: Any) -> int:
    if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
        raise ConfigurationError(
            f"LoggingMiddleware option partitions={partitions!r} is invalid; pass an integer of 1 or more."
        )
    return partitions


class LoggingMiddleware(Observer):
    """Log one structured line per handler call: event, handler, partition, outcome and duration."""

    __slots__ = ("json", "level", "logger", "partitions")

    def __init__(
        self,
        *,
        logger: str | logging.Logger = DEFAULT_LOGGER,
        level: str | int = logging.INFO,
        json: bool = False,
        partitions: int = 1,
    ) -> None:
        self.logger: logging.Logger = _check_logger(logger)
        """Where the lines go."""
        self.level: int = _check_level(level)
        """The level of ``ok`` and ``skipped`` lines (failures use at least WARNING)."""
        self.json: bool = _check_json(json)
        """Whether each line is a JSON object instead of ``key=value`` text."""
        self.partitions: int = _check_partitions(partitions)
        """How many partitions the subjects are spread over."""

    def enter(self, ctx: EventContext) -> float | None:
        """The start time, or None when the logger is off for ``level`` (then nothing is logged)."""
        return perf_counter() if self.logger.isEnabledFor(self.level) else None

    def exit(self, ctx: EventContext, start: float | None, error: BaseException | None) -> None:
        """Log the outcome (a cancelled call is not logged; exceptions go on unchanged)."""
        if start is None:
            return
        if error is None:
            self._write(ctx, OK, start, None)
            return
        outcome = outcome_of(error)
        if outcome == SKIPPED:
            self._write(ctx, outcome, start, None)
        elif outcome != CANCELLED:
            self._write(ctx, outcome, start, error)

    def _write(self, ctx: EventContext, outcome: Outcome, start: float, error: BaseException | None) -> None:
        # A logging bug must not turn a handler's success into a failure (nor hide its error).
        try:
            duration_ms = (perf_counter() - start) * 1000.0
            event = ctx.raw_event
            partition = partition_of(event.subject, self.partitions) if self.partitions > 1 else 0
            attempts = ctx.get_metadata(ATTEMPTS)
            reason = error.reason if isinstance(error, DeadLetterEvent) else None
            extra: dict[str, Any] | None = None
            args: tuple[Any, ...]
            if self.json:
                extra = {
                    "event_id": event.id,
                    "event_type": event.type,
                    "subject": event.subject,
                    "handler": ctx.rule.name,
                    "partition": partition,
                    "outcome": outcome,
                    "duration_ms": round(duration_ms, 3),
                }
                if attempts is not None:
                    extra["attempts"] = attempts
                if error is not None:
                    extra["error"] = f"{type(error).__name__}: {error}"
                if reason is not None:
                    extra["reason"] = reason
                line_format, args = "%s", (_ENCODER.encode(extra),)
            else:
                args = (event.id, event.type, event.subject, ctx.rule.name, partition, outcome, duration_ms)
                if attempts is not None:
                    args += (attempts,)
                if error is not None:
                    args += (error,)
                if reason is not None:
                    args += (reason,)
                line_format = _FORMATS[attempts is not None, error is not None, reason is not None]
            level = self.level if error is None else max(self.level, logging.WARNING)
            logger = self.logger
            # Building the record + handle is Logger.log without its stack walk for the caller (which
            # would only ever name this method) and the per-record work _record leaves out.
            if type(logger) is logging.Logger and logging.getLogRecordFactory() is _LogRecord:
                record = _record(logger.name, level, line_format, args, extra)
                if logger.filters or logger.disabled:
                    logger.handle(record)
                else:  # what handle() does when the logger has no filter to ask
                    logger.callHandlers(record)
            else:  # a Logger subclass or a record factory of the application's: as logging does it
                logger.handle(
                    logger.makeRecord(logger.name, level, __file__, 0, line_format, args, None, None, extra)
                )
        except Exception:
            _log.exception("LoggingMiddleware could not log a call of %s", ctx.rule.name)

    def __repr__(self) -> str:
        return (
            f"LoggingMiddleware(logger={self.logger.name!r}, level={logging.getLevelName(self.level)!r}, "
            f"json={self.json!r}, partitions={self.partitions!r})"
        )


@dataclass(frozen=True, slots=True)
class LoggingSettings(EnvSettings):
    """``KRULES_HANDLER_LOG_LEVEL``: the level of the lines ``krules run``'s logging middleware logs."""

    handler_log_level: str = setting("INFO", log_level)


def from_settings(build: ChainBuild) -> LoggingMiddleware:
    """The logging middleware ``krules run`` installs: lines at ``KRULES_HANDLER_LOG_LEVEL``, as JSON
    with ``KRULES_LOG_JSON``, partitions counted as the engine's settings say."""
    own = LoggingSettings.from_env(build.env)
    settings = build.settings
    return LoggingMiddleware(
        level=own.handler_log_level, json=settings.log_json, partitions=settings.partition_count
    )
