"""Log records for the logging middleware's lines, made without ``logging.LogRecord``'s constructor.

What it replaces: ``Logger.makeRecord`` (``LogRecord.__init__``) for the one line per handler call
of :mod:`middleware.logging`.

Why: the constructor works out, per record, things that are the same for every line of one module
(its file and module name, the process) or cheap to look up directly; with a logger enabled it is
most of a line's cost.  :func:`record_maker` makes the same record (same class, same attributes,
same values: tests/middleware/test_logging.py compares it with logging's own) for a fraction of
that.  The logging middleware uses it only for a plain ``logging.Logger`` with the default record
factory; a Logger subclass or an application's record factory gets its records from ``logging``.

Measured gain: no figure of its own was recorded.  It is one of the three changes (with
:mod:`middleware._span_recorder` and the plain-number metrics) that took the default chain from
14.8x the bare order cascade to 5.8x traced and 2.5x untraced (wall clock, commit 3e9effc).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from time import time_ns
from typing import Any, Final

__all__ = ["MakeRecord", "record_maker"]

MakeRecord = Callable[[str, int, str, tuple[Any, ...], "dict[str, Any] | None"], logging.LogRecord]
"""``record(name, level, msg, args, extra)``, as :func:`record_maker` returns it."""

_probe = logging.LogRecord("", logging.INFO, "", 0, "", (), None)
_START: Final = _probe.created - _probe.relativeCreated / 1000.0  # logging's own start time
_TASK_NAMES: Final = "taskName" in _probe.__dict__  # Python 3.12+
del _probe
_process: tuple[int, str | None] | None = None
"""(process id, process name) of this process, looked up at its first line (and again after a fork;
a process renamed later keeps its first name in these lines)."""


def _forget_process() -> None:
    global _process
    _process = None


os.register_at_fork(after_in_child=_forget_process)


def _look_up_process() -> tuple[int, str | None]:
    # (process id, process name) as LogRecord finds them, looked up once per process.
    global _process
    name: str | None = "MainProcess"
    mp = sys.modules.get("multiprocessing")
    if mp is not None:
        with contextlib.suppress(Exception):  # as logging does: a broken name is no name
            name = mp.current_process().name
    _process = (os.getpid(), name)
    return _process


def _task_name() -> str | None:
    # As LogRecord does on Python 3.12+: the running asyncio task's name, if any.
    if not getattr(logging, "logAsyncioTasks", False):
        return None
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    try:
        task = asyncio.current_task()
    except Exception:
        return None
    return None if task is None else task.get_name()


_LogRecord: Final = logging.LogRecord
_new: Final = object.__new__


def record_maker(pathname: str) -> MakeRecord:
    """``record(name, level, msg, args, extra)``: the ``logging.LogRecord`` that ``Logger.makeRecord``
    makes for a line logged from line 0 of the module ``pathname`` (no caller looked up)."""
    fixed = {
        "pathname": pathname,
        "filename": os.path.basename(pathname),
        "module": os.path.splitext(os.path.basename(pathname))[0],
        "lineno": 0,
        "funcName": None,
        "exc_info": None,
        "exc_text": None,
        "stack_info": None,
    }

    def record(
        name: str, level: int, msg: str, args: tuple[Any, ...], extra: dict[str, Any] | None
    ) -> logging.LogRecord:
        record = _new(_LogRecord)
        fields = record.__dict__
        fields.update(fixed)
        now = time_ns()
        created = now / 1e9
        fields["name"] = name
        fields["msg"] = msg
        fields["args"] = args
        fields["levelname"] = logging.getLevelName(level)
        fields["levelno"] = level
        fields["created"] = created
        msecs = (now % 1_000_000_000) // 1_000_000 + 0.0
        if msecs == 999.0 and int(created) != now // 1_000_000_000:
            msecs = 0.0  # the float seconds rounded up to the next second (as Python 3.13's logging does)
        fields["msecs"] = msecs
        fields["relativeCreated"] = (created - _START) * 1000.0
        if logging.logThreads:
            fields["thread"] = threading.get_ident()
            fields["threadName"] = threading.current_thread().name
        else:
            fields["thread"] = fields["threadName"] = None
        process = _process if _process is not None else _look_up_process()
        fields["process"] = process[0] if logging.logProcesses else None
        fields["processName"] = process[1] if logging.logMultiprocessing else None
        if _TASK_NAMES:
            fields["taskName"] = _task_name()
        if extra:
            fields.update(extra)
        return record

    return record
