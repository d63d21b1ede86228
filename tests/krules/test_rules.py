"""The rules registry: decorators, validation, and the matching index."""

from __future__ import annotations

from typing import Any

import pytest

from krules.errors import RuleDefinitionError
from krules.rules import RuleRegistry


async def noop(ctx: Any) -> None:
    return None


def test_on_matches_exact_types_globs_and_several_patterns() -> None:
    registry = RuleRegistry()

    @registry.on("order.submitted")
    async def exact(ctx: Any) -> None: ...

    @registry.on("order.*")
    async def glob(ctx: Any) -> None: ...

    @registry.on("payment.completed", "order.shipped")
    async def several(ctx: Any) -> None: ...

    @registry.on("*")
    async def everything(ctx: Any) -> None: ...

    def names(event_type: str) -> list[str]:
        return [r.handler.__name__ for r in registry.match(event_type)]

    assert names("order.submitted") == ["exact", "glob", "everything"]
    assert names("order.shipped") == ["glob", "several", "everything"]
    assert names("payment.completed") == ["several", "everything"]
    assert names("user.login") == ["everything"]


def test_glob_matching_is_case_sensitive_and_supports_character_classes() -> None:
    registry = RuleRegistry()
    registry.on("sensor.reading.[ab]")(noop)
    assert registry.match("sensor.reading.a")
    assert not registry.match("sensor.reading.c")
    assert not registry.match("Sensor.reading.a")


def test_match_results_are_memoised_and_invalidated_by_new_rules() -> None:
    registry = RuleRegistry()
    registry.on("order.*")(noop)
    first = registry.match("order.submitted")
    assert registry.match("order.submitted") is first

    async def later(ctx: Any) -> None: ...

    registry.on("order.submitted")(later)
    assert [r.handler for r in registry.match("order.submitted")] == [noop, later]


def test_a_plain_function_handler_is_rejected_at_registration_with_a_fix() -> None:
    registry = RuleRegistry()

    with pytest.raises(RuleDefinitionError, match=r"async def validate\(ctx\)"):

        @registry.on("order.submitted")
        def validate(ctx: Any) -> None: ...

    assert registry.match("order.submitted") == ()


@pytest.mark.parametrize("pattern", ["", " order", "order submitted", "order.[x", 42, None])
def test_malformed_event_type_patterns_are_rejected(pattern: Any) -> None:
    with pytest.raises(RuleDefinitionError, match="pattern"):
        RuleRegistry().on(pattern)


def test_on_without_patterns_is_rejected() -> None:
    with pytest.raises(RuleDefinitionError, match="at least one"):
        RuleRegistry().on()


def test_non_callable_filters_are_rejected() -> None:
    with pytest.raises(RuleDefinitionError, match="not callable"):
        RuleRegistry().when(5)  # type: ignore[arg-type]


def test_when_works_below_and_above_on_and_keeps_top_to_bottom_order() -> None:
    registry = RuleRegistry()

    def a(ctx: Any) -> bool:
        return True

    def b(ctx: Any) -> bool:
        return True

    def c(ctx: Any) -> bool:
        return True

    @registry.when(a)
    @registry.on("x")
    @registry.when(b)
    @registry.when(c)
    async def handler(ctx: Any) -> None: ...

    (rule,) = registry.match("x")
    assert [f for f, _ in rule.filters] == [a, b, c]


def test_async_filters_are_recognised() -> None:
    registry = RuleRegistry()

    async def is_big(ctx: Any) -> bool:
        return True

    registry.when(is_big)(registry.on("x")(noop))
    (rule,) = registry.match("x")
    assert rule.filters == [(is_big, True)]


def test_plain_middleware_is_rejected() -> None:
    registry = RuleRegistry()

    def mw(ctx: Any, next: Any) -> None: ...

    with pytest.raises(RuleDefinitionError, match=r"async def mw\(ctx, next\)"):
        registry.middleware(mw)


def test_middleware_chains_are_composed_at_registration_not_per_call() -> None:
    registry = RuleRegistry()
    rule = registry.add_rule(noop, ["x"])
    assert rule.call is noop

    async def mw(ctx: Any, next: Any) -> None:
        await next()

    registry.middleware(mw)
    composed = rule.call
    assert composed is not noop
    assert registry.match("x")[0].call is composed


def test_remove_unregisters_a_handler() -> None:
    registry = RuleRegistry()
    registry.on("x", "y")(noop)
    assert registry.remove(noop) == 1
    assert registry.match("x") == () and registry.match("y") == ()


def test_lookup_cost_does_not_depend_on_non_matching_rules() -> None:
    # Structural check (no timing): one memoised dict lookup regardless of how many rules exist.
    registry = RuleRegistry()
    for i in range(1000):
        registry.on(f"other.{i}", f"glob.{i}.*")(noop)
    registry.on("order.submitted")(noop)
    first = registry.match("order.submitted")
    assert len(first) == 1
    assert registry.match("order.submitted") is first


def test_cleared_or_removed_rules_no_longer_match() -> None:
    registry = RuleRegistry()
    registry.on("x")(noop)
    assert registry.match("x")
    registry.clear()
    assert registry.match("x") == ()
    registry.on("y")(noop)
    assert registry.match("y")
    registry.remove(noop)
    assert registry.match("y") == ()


def test_sync_filters_before_the_first_async_one_are_counted() -> None:
    registry = RuleRegistry()

    async def slow(ctx: Any) -> bool:
        return True

    def fast(ctx: Any) -> bool:
        return True

    async def handler(ctx: Any) -> None: ...

    registry.when(fast)(registry.on("x")(registry.when(slow, fast)(handler)))
    (rule,) = registry.match("x")
    assert [f for f, _ in rule.filters] == [fast, slow, fast]
    assert rule.sync_filters == 1


def test_middleware_can_be_added_before_or_after_another_by_object_or_name() -> None:
    registry = RuleRegistry()

    async def outer(ctx: Any, next: Any) -> None: ...

    async def inner(ctx: Any, next: Any) -> None: ...

    async def middle(ctx: Any, next: Any) -> None: ...

    async def first(ctx: Any, next: Any) -> None: ...

    registry.add_middleware(outer)
    registry.add_middleware(inner)
    registry.add_middleware(middle, after=outer)
    registry.add_middleware(first, before="outer")
    assert registry.middlewares == (first, outer, middle, inner)
    with pytest.raises(RuleDefinitionError, match="is not in the chain"):
        registry.add_middleware(noop_mw, before="missing")


async def noop_mw(ctx: Any, next: Any) -> None:
    await next()


def test_the_middleware_chain_is_frozen_once_the_app_has_started() -> None:
    registry = RuleRegistry()
    registry.add_middleware(noop_mw)
    registry.freeze()
    with pytest.raises(RuleDefinitionError, match="frozen once the app has started"):
        registry.add_middleware(noop_mw)

    @registry.on("still.allowed")  # rules may still be added
    async def late(ctx: Any) -> None: ...

    assert registry.match("still.allowed")[0].handler is late
