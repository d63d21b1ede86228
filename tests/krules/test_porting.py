"""What a KRules 3 rule module relies on and finds here once its imports are changed (KRules' own
documentation and code say what each name holds and does)."""

from __future__ import annotations

from typing import Any

from krules import event_types
from krules.context import EventContext
from krules.testing import KRulesTestApp

# -- krules.event_types (KRules: krules_core.event_types) ----------------------------------------


def test_event_types_has_every_name_krules_exports_with_its_value() -> None:
    assert {name: getattr(event_types, name) for name in event_types.__all__} == {
        "SUBJECT_PROPERTY_CHANGED": "subject-property-changed",
        "SubjectPropertyChanged": "subject-property-changed",
        "SUBJECT_PROPERTY_DELETED": "subject-property-deleted",
        "SubjectPropertyDeleted": "subject-property-deleted",
        "SUBJECT_DELETED": "subject-deleted",
        "SubjectDeleted": "subject-deleted",
        "SUBJECT_FLUSHED": "subject-deleted",
        "SubjectFlushed": "subject-deleted",
    }


async def test_a_rule_on_subject_flushed_runs_when_the_subject_is_flushed(krules_app: KRulesTestApp) -> None:
    flushed: list[tuple[str, Any]] = []

    @krules_app.on(event_types.SUBJECT_FLUSHED)
    async def on_flushed(ctx: EventContext) -> None:
        flushed.append((ctx.subject.name, ctx.payload["props"]))

    user = krules_app.subject("user-1")
    await user.set("name", "Ada", muted=True)
    await user.flush()
    assert flushed == [("user-1", {"name": "Ada"})]
