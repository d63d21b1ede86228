"""The order flow written as a KRules 3 module (only its imports swapped) ends as it ends in KRules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import ModuleType

import pytest
from dependency_injector import providers

from krules.config import Settings
from krules.events import Event
from krules.loader import load_rule_module

CHANGED = "subject-property-changed"


class Ported:
    """The ported module, its own container driven as a KRules app drives it, and what it emitted."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.container = module.container
        self.events: list[Event] = []
        self.container.engine().event_observers.append(self.events.append)

    def types(self) -> list[str]:
        return [event.type for event in self.events]


@pytest.fixture(params=["concurrent", "sequential"])
async def ported(request: pytest.FixtureRequest) -> AsyncIterator[Ported]:
    module = load_rule_module("rulesets.ported_orders", fresh=True)  # a container of its own each time
    module.container.settings.override(providers.Object(Settings(handler_order=request.param)))
    app = Ported(module)
    yield app
    await app.container.engine().close()


async def test_a_ported_krules_module_ships_a_valid_order_as_krules_does(ported: Ported) -> None:
    container, emit = ported.container, ported.module.emit

    await emit("order.submitted", container.subject("order-1"), {"total": 30})

    assert await container.subject("order-1").dict() == {
        "name": "order-1",
        "total": 30,
        "status": "shipped",
        "paid_amount": 30,
        "ext": {"status_history": ["validated", "paid", "shipped"]},
    }
    assert ported.types() == [
        "order.submitted",
        CHANGED,  # total
        CHANGED,  # status validated
        "order.validated",
        "payment.process",
        CHANGED,  # paid_amount
        CHANGED,  # status paid
        "payment.completed",
        CHANGED,  # status shipped
        "order.shipped",
    ]


async def test_a_ported_krules_module_rejects_then_accepts_a_corrected_order(ported: Ported) -> None:
    container, emit = ported.container, ported.module.emit

    await emit("order.submitted", container.subject("order-2"), {"total": 0})
    assert await container.subject("order-2").dict() == {
        "name": "order-2",
        "status": "rejected",
        "ext": {"status_history": ["rejected"]},
    }
    [rejected] = [event for event in ported.events if event.type == "order.rejected"]
    assert rejected.data == {"reason": "total must be greater than 0"}

    await emit("order.submitted", container.subject("order-2"), {"total": 5})
    await emit("order.submitted", container.subject("order-2"), {"total": 7})  # accepted already: ignored

    order = await container.subject("order-2").dict()
    assert (order["status"], order["total"], order["paid_amount"]) == ("shipped", 5, 5)
    assert order["ext"]["status_history"] == ["rejected", "validated", "paid", "shipped"]
