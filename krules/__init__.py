"""krules: a reactive event-rule engine with subjects.

Rule modules are plain modules of ``async def`` handlers::

    from krules import on, when

    @on("order.submitted")
    @when(lambda ctx: ctx.payload["total"] > 0)
    async def validate(ctx):
        await ctx.subject.set("status", "validated")
        await ctx.emit("order.validated")
"""

from __future__ import annotations

from krules import event_types
from krules.app import default_container, emit, middleware, on, subject, use_container, when
from krules.chain import SkipEvent
from krules.config import Settings
from krules.container import KRulesContainer
from krules.context import EventContext
from krules.errors import KRulesError
from krules.subject import Subject
from krules.version import __version__

__all__ = [
    "EventContext",
    "KRulesContainer",
    "KRulesError",
    "Settings",
    "SkipEvent",
    "Subject",
    "__version__",
    "default_container",
    "emit",
    "event_types",
    "middleware",
    "on",
    "subject",
    "use_container",
    "when",
]
