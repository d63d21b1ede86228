"""What the built-ins share: one classification of how a handler call ended."""

from __future__ import annotations

import asyncio

import pytest

from middleware.base import DeadLetterEvent, SkipEvent, is_failure, outcome_of
from middleware.circuit_breaker import CircuitOpenError


class _SkippedAndDeadLettered(SkipEvent, DeadLetterEvent):
    pass


@pytest.mark.parametrize(
    ("error", "outcome", "failure"),
    [
        (None, "ok", False),
        (SkipEvent(), "skipped", False),
        (DeadLetterEvent("bad event"), "dead_lettered", True),
        (CircuitOpenError("h", "open", 1.0), "dead_lettered", True),
        (ValueError("boom"), "failed", True),
        (asyncio.CancelledError(), "cancelled", False),
        (KeyboardInterrupt(), "cancelled", False),
        (_SkippedAndDeadLettered("both"), "skipped", False),
    ],
)
def test_every_built_in_reads_the_same_outcome_of_a_call(
    error: BaseException | None, outcome: str, failure: bool
) -> None:
    assert outcome_of(error) == outcome
    assert is_failure(error) is failure
