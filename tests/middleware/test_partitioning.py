"""The partitioning middleware: handlers run only for owned subjects; the others' events are re-routed."""

from __future__ import annotations

from typing import Any

import pytest

from krules.context import EventContext
from krules.errors import ConfigurationError
from krules.events import Event
from krules.partitioning import partition_of
from krules.testing import KRulesTestApp
from middleware.partitioning import PartitioningMiddleware


class RecordingTransport:
    """Stands in for the partition streams: records what a turn sends when it ends."""

    def __init__(self) -> None:
        self.sent: list[Event] = []

    async def check(self) -> None:
        return None

    async def send(self, events: Any, on_behalf_of: Any = None) -> list[str]:
        self.sent.extend(events)
        return [event.id for event in events]


def name_in(partition: int, partitions: int, stem: str) -> str:
    i = 0
    while partition_of(f"{stem}{i}", partitions) != partition:
        i += 1
    return f"{stem}{i}"


async def test_an_event_for_a_subject_owned_elsewhere_is_re_routed_once_and_no_handler_runs() -> None:
    rerouted: list[int] = []
    async with KRulesTestApp() as app:
        app.container.registry().add_middleware(
            PartitioningMiddleware(partitions=2, owned=[0], on_reroute=rerouted.append)
        )
        transport = RecordingTransport()
        app.engine.transport = transport  # type: ignore[assignment]
        ran: list[str] = []
        mine, theirs = name_in(0, 2, "mine-"), name_in(1, 2, "theirs-")

        @app.on("ping")
        async def first(ctx: EventContext) -> None:
            ran.append(f"first {ctx.subject.name}")

        @app.on("ping")
        async def second(ctx: EventContext) -> None:
            ran.append(f"second {ctx.subject.name}")

        for name in (mine, theirs):
            await app.engine.process(app.engine.new_event("ping", name, {}))
        assert sorted(ran) == [f"first {mine}", f"second {mine}"]
        assert [(e.type, e.subject) for e in transport.sent] == [("ping", theirs)]  # once, for two handlers
        assert rerouted == [1]
        assert not app.recorder.failures  # a re-route is not a failure


async def test_without_a_transport_the_guard_lets_handlers_run() -> None:
    async with KRulesTestApp() as app:
        app.container.registry().add_middleware(PartitioningMiddleware(partitions=2, owned=[0]))
        ran: list[str] = []

        @app.on("ping")
        async def handler(ctx: EventContext) -> None:
            ran.append(ctx.subject.name)

        theirs = name_in(1, 2, "theirs-")
        await app.engine.process(app.engine.new_event("ping", theirs, {}))
        assert ran == [theirs]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"partitions": 0, "owned": [0]}, "partitions=0 is invalid"),
        ({"partitions": 2, "owned": [2]}, "owned=\\[2\\] is invalid"),
        ({"partitions": 2, "owned": []}, "owned=\\[\\] is invalid"),
    ],
)
def test_bad_options_are_one_sentence(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PartitioningMiddleware(**options)
