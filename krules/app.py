"""The default app behind ``from krules import on, when, middleware, emit, subject``.

Rule modules written against the module-level API register on whichever container is the default
when they are imported; ``krules run`` and the testing plugin choose it (``use_container``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from krules.container import KRulesContainer
from krules.context import current_context
from krules.rules import Filter
from krules.subject import Subject

__all__ = [
    "default_container",
    "emit",
    "middleware",
    "on",
    "set_default_container",
    "subject",
    "use_container",
    "when",
]

F = TypeVar("F", bound=Callable[..., Any])

_default: KRulesContainer | None = None


def default_container() -> KRulesContainer:
    """The container the module-level API is bound to (created on first use)."""
    global _default
    if _default is None:
        _default = KRulesContainer()
    return _default


def set_default_container(container: KRulesContainer | None) -> KRulesContainer | None:
    """Make ``container`` the default; return the previous one."""
    global _default
    previous, _default = _default, container
    return previous


@contextmanager
def use_container(container: KRulesContainer) -> Iterator[KRulesContainer]:
    """Bind the module-level API to ``container`` for the duration of the block."""
    previous = set_default_container(container)
    try:
        yield container
    finally:
        set_default_container(previous)


def on(*patterns: str) -> Callable[[F], F]:
    """Register an ``async def handler(ctx)`` for events matching any of ``patterns`` (exact or glob)."""
    return default_container().registry().on(*patterns)


def when(*filters: Filter) -> Callable[[F], F]:
    """Add filters (sync or async functions of ctx) to a handler; stacked filters must all pass."""
    return default_container().registry().when(*filters)


def middleware(mw: F) -> F:
    """Register ``async def mw(ctx, next)`` around every handler call."""
    return default_container().registry().middleware(mw)


async def emit(
    event_type: str, subject: Subject | str, payload: dict[str, Any] | None = None, **ext: Any
) -> None:
    """Emit an event: part of the cascade inside a handler, a new turn outside."""
    ctx = current_context()
    engine = ctx._engine if ctx is not None else default_container().engine()
    await engine.emit(event_type, subject, payload, **ext)


def subject(name: str) -> Subject:
    """The subject called ``name`` (inside a handler, the turn's cached one)."""
    ctx = current_context()
    engine = ctx._engine if ctx is not None else default_container().engine()
    return engine.subject(name)
