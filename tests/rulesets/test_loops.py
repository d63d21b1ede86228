"""The loop-avoidance examples, and what the loop guard does with a rule that really loops."""

from __future__ import annotations

import asyncio
import sys
from types import FrameType

import pytest

from krules import EventContext
from krules.errors import CascadeDepthExceeded
from krules.event_types import SUBJECT_PROPERTY_CHANGED
from krules.testing import KRulesTestApp

CHANGED = "subject-property-changed"


@pytest.fixture
def app(krules_app: KRulesTestApp) -> KRulesTestApp:
    krules_app.load("rulesets.loops")
    return krules_app


async def counter(app: KRulesTestApp, name: str, *, ext: bool = False) -> object:
    """The stored change counter of subject ``name`` (ordinary or extended property)."""
    props, ext_props = await app.storage.load(name)
    return (ext_props if ext else props).get("changes")


async def set_twice(app: KRulesTestApp, name: str) -> None:
    """Three property changes: one event with one change, one with two."""
    await app.emit("loops.set", name, {"colour": "red"})
    await app.emit("loops.set", name, {"colour": "blue", "size": 3})
    await app.settle()


async def test_a_muted_counter_counts_each_change_once_and_emits_nothing(app: KRulesTestApp) -> None:
    await set_twice(app, "muted-1")

    assert await counter(app, "muted-1") == 3
    assert app.recorder.types("muted-1") == ["loops.set", CHANGED, "loops.set", CHANGED, CHANGED]
    assert app.recorder.failures == []


async def test_a_counter_filtered_by_property_name_counts_each_change_once(app: KRulesTestApp) -> None:
    await set_twice(app, "filtered-1")

    assert await counter(app, "filtered-1") == 3
    # each change is followed by the counter's own change, which the rule ignores: the cascade ends
    assert app.recorder.changes("filtered-1") == [
        ("colour", "red"),
        ("changes", 1),
        ("colour", "blue"),
        ("changes", 2),
        ("size", 3),
        ("changes", 3),
    ]
    assert max(e.depth for e in app.recorder.events) == 2  # loops.set (0) -> colour (1) -> changes (2)
    assert app.recorder.failures == []


async def test_an_extended_counter_counts_each_change_once_and_emits_nothing(app: KRulesTestApp) -> None:
    await set_twice(app, "ext-1")

    assert await counter(app, "ext-1", ext=True) == 3
    assert await counter(app, "ext-1") is None  # not an ordinary property
    assert app.recorder.types("ext-1") == ["loops.set", CHANGED, "loops.set", CHANGED, CHANGED]
    assert app.recorder.failures == []


@pytest.mark.parametrize("name", ["muted-1", "filtered-1", "ext-1"])
async def test_setting_the_same_value_again_is_not_counted(app: KRulesTestApp, name: str) -> None:
    await app.emit("loops.set", name, {"colour": "red"})
    await app.emit("loops.set", name, {"colour": "red"})
    await app.settle()

    assert await counter(app, name, ext=name.startswith("ext-")) == 1


async def test_the_examples_do_not_count_each_others_subjects(app: KRulesTestApp) -> None:
    await app.emit("loops.set", "muted-1", {"colour": "red"})
    await app.emit("loops.set", "order-1", {"colour": "red"})
    await app.settle()

    assert await app.storage.load("muted-1") == ({"colour": "red", "changes": 1}, {})
    assert await app.storage.load("order-1") == ({"colour": "red"}, {})


# -- the loop guard --------------------------------------------------------------------------


def register_runaway_rules(app: KRulesTestApp) -> None:
    """The "bad handler" of the KRules docs, limited to the subject ``runaway``."""

    @app.on("loop.kick")
    async def kick(ctx: EventContext) -> None:
        await ctx.subject.set("counter", 1)

    @app.on(SUBJECT_PROPERTY_CHANGED)
    @app.when(lambda ctx: ctx.subject.name == "runaway")
    async def count_forever(ctx: EventContext) -> None:
        await ctx.subject.set("counter", lambda c: (c or 0) + 1)


async def test_a_looping_rule_is_stopped_at_depth_32_with_one_clear_failure(
    krules_app: KRulesTestApp,
) -> None:
    register_runaway_rules(krules_app)

    await krules_app.emit("loop.kick", "runaway")
    await krules_app.settle()

    [failure] = krules_app.recorder.failures
    error = failure.error
    assert isinstance(error, CascadeDepthExceeded)
    assert failure.handler.endswith("count_forever")
    assert failure.event.depth == error.limit == 32
    assert error.chain == ["loop.kick(runaway)"] + [f"{CHANGED}(runaway)"] * 33
    assert "stopped at depth 32" in str(error)
    assert "loop.kick(runaway) -> subject-property-changed(runaway)" in str(error)
    # the events dispatched: the kick and 32 changes; the 33rd write was refused before it happened
    assert krules_app.recorder.types("runaway") == ["loop.kick"] + [CHANGED] * 32
    assert await krules_app.stored("runaway") == {"counter": 32}


def stack_depth() -> int:
    frame: FrameType | None = sys._getframe(1)
    depth = 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


async def test_the_guarded_cascade_uses_a_fraction_of_the_python_stack(krules_app: KRulesTestApp) -> None:
    depths: list[int] = []

    @krules_app.on("loop.kick", SUBJECT_PROPERTY_CHANGED)
    @krules_app.when(lambda ctx: ctx.subject.name == "deep")
    async def count_forever(ctx: EventContext) -> None:
        depths.append(stack_depth())
        await ctx.subject.set("counter", lambda c: (c or 0) + 1)

    await krules_app.emit("loop.kick", "deep")
    await krules_app.settle()

    assert [type(f.error) for f in krules_app.recorder.failures] == [CascadeDepthExceeded]
    assert len(depths) == 33  # the kick and 32 changes
    # KRules has no guard and dies of RecursionError (~197 levels); 32 levels must leave room to spare
    assert depths[-1] - depths[0] < sys.getrecursionlimit() // 2


async def test_other_subjects_still_work_while_and_after_one_loops(app: KRulesTestApp) -> None:
    register_runaway_rules(app)

    await asyncio.gather(
        app.emit("loop.kick", "runaway"),
        app.emit("loops.set", "muted-1", {"colour": "red"}),
    )
    await app.emit("loops.set", "muted-1", {"colour": "blue"})
    await app.settle()

    assert [f.event.subject for f in app.recorder.failures] == ["runaway"]
    assert await app.stored("muted-1") == {"colour": "blue", "changes": 2}


async def test_a_subject_that_looped_once_handles_its_next_event(krules_app: KRulesTestApp) -> None:
    register_runaway_rules(krules_app)
    await krules_app.emit("loop.kick", "runaway")

    @krules_app.on("loop.reset")
    async def reset(ctx: EventContext) -> None:
        await ctx.subject.set("counter", 0, muted=True)

    await krules_app.emit("loop.reset", "runaway")
    await krules_app.settle()

    assert await krules_app.stored("runaway") == {"counter": 0}
    assert len(krules_app.recorder.failures) == 1
