"""The order flow example: the cascade from order.submitted to order.shipped, and rejections."""

from __future__ import annotations

import pytest

from krules.testing import KRulesTestApp

CHANGED = "subject-property-changed"


@pytest.fixture
def app(krules_app: KRulesTestApp) -> KRulesTestApp:
    krules_app.load("rulesets.orders")
    return krules_app


async def test_a_valid_order_cascades_from_submitted_to_shipped(app: KRulesTestApp) -> None:
    await app.emit("order.submitted", "order-1", {"total": 30, "customer": "ada", "items": ["book"]})
    await app.settle()

    assert app.recorder.types("order-1") == [
        "order.submitted",
        CHANGED,  # total
        CHANGED,  # customer
        CHANGED,  # items
        CHANGED,  # status validated
        "order.validated",
        "payment.process",
        CHANGED,  # paid_amount
        CHANGED,  # status paid
        "payment.completed",
        "order.ship",
        CHANGED,  # status shipped
        "order.shipped",
    ]
    assert app.recorder.changes("order-1") == [
        ("total", 30),
        ("customer", "ada"),
        ("items", ["book"]),
        ("status", "validated"),
        ("paid_amount", 30),
        ("status", "paid"),
        ("status", "shipped"),
    ]
    assert app.recorder.failures == []


async def test_a_shipped_order_is_stored_with_its_payment(app: KRulesTestApp) -> None:
    await app.emit("order.submitted", "order-1", {"total": 30, "customer": "ada", "items": ["book"]})
    await app.settle()

    assert await app.stored("order-1") == {
        "total": 30,
        "customer": "ada",
        "items": ["book"],
        "status": "shipped",
        "paid_amount": 30,
    }


async def test_the_payment_request_carries_the_order_total(app: KRulesTestApp) -> None:
    await app.emit("order.submitted", "order-7", {"total": 12.5})
    await app.settle()

    [payment] = app.recorder.of_type("payment.process")
    assert payment.subject == "order-7"
    assert payment.data == {"amount": 12.5}
    assert app.recorder.of_type("payment.completed")[0].data == {"amount": 12.5}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"total": 0}, "total must be greater than 0, not 0"),
        ({"total": -5}, "total must be greater than 0, not -5"),
        ({}, "total must be a number, not None"),
        ({"total": "30"}, "total must be a number, not '30'"),
        ({"total": True}, "total must be a number, not True"),
    ],
)
async def test_an_order_without_a_positive_total_is_rejected_with_the_reason(
    app: KRulesTestApp, payload: dict[str, object], reason: str
) -> None:
    await app.emit("order.submitted", "order-2", payload)
    await app.settle()

    assert app.recorder.types("order-2") == ["order.submitted", CHANGED, CHANGED, "order.rejected"]
    assert app.recorder.of_type("order.rejected")[0].data == {"reason": reason}
    assert await app.stored("order-2") == {"status": "rejected", "rejection_reason": reason}


async def test_a_rejected_order_can_be_resubmitted_with_a_corrected_total(app: KRulesTestApp) -> None:
    await app.emit("order.submitted", "order-3", {"total": -1})
    await app.emit("order.submitted", "order-3", {"total": 8})
    await app.settle()

    assert [e.type for e in app.recorder.events if e.type.startswith("order.")] == [
        "order.submitted",
        "order.rejected",
        "order.submitted",
        "order.validated",
        "order.ship",
        "order.shipped",
    ]
    assert await app.stored("order-3") == {"total": 8, "status": "shipped", "paid_amount": 8}


async def test_resubmitting_an_accepted_order_does_not_charge_it_twice(app: KRulesTestApp) -> None:
    await app.emit("order.submitted", "order-4", {"total": 20})
    await app.emit("order.submitted", "order-4", {"total": 99})
    await app.settle()

    assert len(app.recorder.of_type("payment.process")) == 1
    assert app.recorder.types("order-4")[-2:] == ["order.shipped", "order.submitted"]
    assert await app.stored("order-4") == {"total": 20, "status": "shipped", "paid_amount": 20}


async def test_orders_flow_independently_of_each_other(app: KRulesTestApp) -> None:
    await app.emit("order.submitted", "order-a", {"total": 10})
    await app.emit("order.submitted", "order-b", {"total": 0})
    await app.settle()

    assert (await app.stored("order-a"))["status"] == "shipped"
    assert (await app.stored("order-b"))["status"] == "rejected"
    assert [e.subject for e in app.recorder.of_type("order.shipped")] == ["order-a"]
    assert [e.subject for e in app.recorder.of_type("order.rejected")] == ["order-b"]
