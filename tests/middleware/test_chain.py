"""The chain: consecutive observers run in one layer exactly as if they were nested middleware."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any

import pytest

from krules.context import EventContext
from krules.testing import KRulesTestApp
from middleware.base import Next, Observer, build_chain


class Recording(Observer):
    """Records its enter and exit (with the error it saw); may raise in either, or await in exit."""

    def __init__(
        self, name: str, log: list[str], *, fail_enter: bool = False, fail_exit: bool = False
    ) -> None:
        self.name, self.log = name, log
        self.fail_enter, self.fail_exit = fail_enter, fail_exit

    def enter(self, ctx: EventContext) -> str:
        self.log.append(f"enter {self.name}")
        if self.fail_enter:
            raise LookupError(f"{self.name} refuses")
        return f"state of {self.name}"

    def exit(self, ctx: EventContext, state: Any, error: BaseException | None) -> Awaitable[None] | None:
        self.log.append(f"exit {self.name} {state} {error!r}")
        if self.fail_exit:
            raise KeyError(f"{self.name} broke")
        if self.name == "async":
            return self._later()
        return None

    async def _later(self) -> None:
        await asyncio.sleep(0)
        self.log.append(f"awaited {self.name}")


class Plain:
    """The same observer as an ordinary middleware (not fused)."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    async def __call__(self, ctx: EventContext, next: Next) -> None:
        await self.observer(ctx, next)


async def run(chain: list[Any], handler_error: BaseException | None = None) -> BaseException | None:
    """Run ``chain`` around a handler that raises ``handler_error``; what the call raised, or None."""

    async def handler(ctx: EventContext) -> None:
        if handler_error is not None:
            raise handler_error

    call = build_chain(chain, handler)
    try:
        await call(SimpleNamespace())  # type: ignore[arg-type]  # the observers here never read ctx
    except BaseException as exc:
        return exc
    return None


def observers(log: list[str], **failing: dict[str, bool]) -> list[Recording]:
    return [Recording(name, log, **failing.get(name, {})) for name in ("outer", "async", "inner")]


@pytest.mark.parametrize(
    "failing, handler_error",
    [
        ({}, None),
        ({}, ValueError("handler failed")),
        ({"async": {"fail_enter": True}}, None),
        ({"inner": {"fail_exit": True}}, None),
        ({"inner": {"fail_exit": True}}, ValueError("handler failed")),
        ({"outer": {"fail_exit": True}, "inner": {"fail_enter": True}}, None),
        ({"outer": {"fail_exit": True}, "inner": {"fail_exit": True}}, ValueError("handler failed")),
        ({"outer": {"fail_exit": True}, "async": {"fail_exit": True}, "inner": {"fail_exit": True}}, None),
    ],
)
async def test_fused_observers_behave_exactly_like_the_same_observers_nested(
    failing: dict[str, dict[str, bool]], handler_error: BaseException | None
) -> None:
    fused_log: list[str] = []
    nested_log: list[str] = []

    fused_error = await run(list(observers(fused_log, **failing)), handler_error)
    nested_error = await run([Plain(o) for o in observers(nested_log, **failing)], handler_error)

    assert fused_log == nested_log
    assert chain_of(fused_error) == chain_of(nested_error)


def chain_of(error: BaseException | None) -> list[str]:
    """The error and what it replaced (its ``__context__``s), as reprs."""
    chain = []
    while error is not None:
        chain.append(repr(error))
        error = error.__context__
    return chain


async def test_an_observer_that_overrides_call_is_run_as_ordinary_middleware() -> None:
    log: list[str] = []

    class Skipping(Recording):
        async def __call__(self, ctx: EventContext, next: Next) -> None:
            log.append("own __call__")

    await run([Recording("outer", log), Skipping("inner", log)])

    assert log == ["enter outer", "own __call__", "exit outer state of outer None"]


async def test_enter_runs_outermost_first_and_exit_innermost_first_with_awaited_exits() -> None:
    log: list[str] = []

    await run(list(observers(log)))

    assert log == [
        "enter outer",
        "enter async",
        "enter inner",
        "exit inner state of inner None",
        "exit async state of async None",
        "awaited async",
        "exit outer state of outer None",
    ]


async def test_a_cancelled_call_reaches_every_exit_and_stays_cancelled() -> None:
    log: list[str] = []
    started = asyncio.Event()

    async def handler(ctx: EventContext) -> None:
        started.set()
        await asyncio.sleep(10)

    call = build_chain([Recording("outer", log), Recording("inner", log)], handler)
    task = asyncio.ensure_future(call(SimpleNamespace()))  # type: ignore[arg-type]
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert [line.split(" state")[0] for line in log[2:]] == ["exit inner", "exit outer"]
    assert all("CancelledError" in line for line in log[2:])


async def test_a_chain_of_observers_only_calls_the_handler_itself_once(krules_app: KRulesTestApp) -> None:
    log: list[str] = []
    krules_app.middleware(Recording("outer", log))
    krules_app.middleware(Recording("inner", log))
    ids: list[str] = []

    @krules_app.on("x")
    async def handler(ctx: EventContext) -> None:
        await ctx.emit("y")

    @krules_app.on("y")
    async def child(ctx: EventContext) -> None:
        ids.append(ctx.event_id)

    await krules_app.emit("x", "s")

    assert len(ids) == 1 and log.count("enter outer") == 2  # the handler and its child's handler
