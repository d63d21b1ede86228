"""Reacting to property changes without looping forever: three ways.

A handler of ``subject-property-changed`` that sets a property on the same subject causes another
``subject-property-changed``, which calls the handler again, and so on::

    @on(SUBJECT_PROPERTY_CHANGED)
    async def count_changes(ctx):                       # loops!
        await ctx.subject.set("changes", lambda c: (c or 0) + 1)

(krules stops such a cascade at depth 32 with ``CascadeDepthExceeded``; KRules ends it with a
swallowed ``RecursionError``.)  Each handler below counts the changes of a subject's properties in
``changes`` and breaks the loop its own way:

1. ``count_changes_muted`` (subjects ``muted-*``): the counter write is **muted**, so it emits no
   event at all.  Use it when nobody needs to react to the counter.
2. ``count_changes_filtered`` (subjects ``filtered-*``): a ``@when`` **filter on the property
   name** ignores the counter's own change.  The counter change is still an event other rules can
   react to; the cascade is exactly one level deeper.
3. ``count_changes_ext`` (subjects ``ext-*``): the counter is an **extended property**, which never
   emits.  Use it for internal bookkeeping kept apart from the subject's business properties
   (``krules subject show`` lists it under ``ext``).

Each handler is also filtered on a subject-name prefix: a rule on ``subject-property-changed``
with no filter reacts to the changes of *every* subject of every loaded module, which is rarely
meant (and here would make the three examples count each other's writes).  Counters start from
nothing, hence ``(c or 0) + 1``.

Handles: ``loops.set`` (sets each payload key as a property of the subject) and
``subject-property-changed`` of ``muted-*``, ``filtered-*`` and ``ext-*`` subjects.  Emits only
property changes.

Try it::

    krules run rulesets.loops
    krules emit loops.set muted-1 --data '{"colour": "red"}'
    krules emit loops.set muted-1 --data '{"colour": "blue", "size": 3}'
    krules subject show muted-1                       # changes 3
    krules emit loops.set ext-1 --data '{"colour": "red"}'
    krules subject show ext-1                         # ext: {"changes": 1}
"""

from __future__ import annotations

from collections.abc import Callable

from krules import EventContext, on, when
from krules.event_types import SUBJECT_PROPERTY_CHANGED

COUNTER = "changes"
"""The property (or extended property) where each example counts the changes."""


def _increment(count: int | None) -> int:
    return (count or 0) + 1


def _subject_kind(prefix: str) -> Callable[[EventContext], bool]:
    """A filter: the event's subject name starts with ``prefix``."""

    def check(ctx: EventContext) -> bool:
        return ctx.subject.name.startswith(prefix)

    check.__name__ = f"subject_starts_with_{prefix.rstrip('-')}"
    return check


@on("loops.set")
async def set_properties(ctx: EventContext) -> None:
    """Set every key of the payload as a property: the changes the examples below count."""
    for prop, value in ctx.payload.items():
        await ctx.subject.set(prop, value)


# 1. Muted write: the counter's change is never an event.
@on(SUBJECT_PROPERTY_CHANGED)
@when(_subject_kind("muted-"))
async def count_changes_muted(ctx: EventContext) -> None:
    """Count a change with a muted write."""
    await ctx.subject.set(COUNTER, _increment, muted=True)


# 2. Filter on the property name: the counter's change is an event, and this rule ignores it.
@on(SUBJECT_PROPERTY_CHANGED)
@when(_subject_kind("filtered-"))
@when(lambda ctx: ctx.property_name != COUNTER)
async def count_changes_filtered(ctx: EventContext) -> None:
    """Count a change of any property but the counter itself."""
    await ctx.subject.set(COUNTER, _increment)


# 3. Extended property: metadata that never emits.
@on(SUBJECT_PROPERTY_CHANGED)
@when(_subject_kind("ext-"))
async def count_changes_ext(ctx: EventContext) -> None:
    """Count a change in an extended property."""
    await ctx.subject.set_ext(COUNTER, _increment)
