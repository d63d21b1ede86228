"""The timer examples: an unpaid order times out, a silent device is reported, then forgotten."""

from __future__ import annotations

from krules.testing import KRulesTestApp


async def test_an_order_not_paid_within_thirty_minutes_is_cancelled(krules_app: KRulesTestApp) -> None:
    krules_app.load("rulesets.payment_timeouts")
    await krules_app.emit("checkout.placed", "order-1", {"total": 30})
    await krules_app.emit("checkout.placed", "order-2", {"total": 40})
    await krules_app.advance(600)
    await krules_app.emit("checkout.paid", "order-2", {"amount": 40})

    await krules_app.advance(1200)

    assert (await krules_app.stored("order-1"))["status"] == "cancelled"
    assert (await krules_app.stored("order-2"))["status"] == "paid"
    assert [e.subject for e in krules_app.recorder.of_type("checkout.cancelled")] == ["order-1"]
    await krules_app.emit("checkout.paid", "order-1", {"amount": 30})
    assert (await krules_app.stored("order-1"))["status"] == "cancelled"
    assert len(krules_app.recorder.of_type("checkout.payment_refused")) == 1


async def test_a_device_silent_for_five_minutes_is_reported_once_and_forgotten_after_a_day(
    krules_app: KRulesTestApp,
) -> None:
    krules_app.load("rulesets.watchdog")
    for _ in range(5):  # a heartbeat a minute keeps it quiet
        await krules_app.emit("device.heartbeat", "sensor-7")
        await krules_app.advance(60)
    assert krules_app.recorder.of_type("device.silent") == []
    last_seen = (await krules_app.storage.load("sensor-7"))[0]["last_seen"]

    await krules_app.advance(300)
    assert len(krules_app.recorder.of_type("device.silent")) == 1
    await krules_app.advance(86_400)

    assert len(krules_app.recorder.of_type("device.silent")) == 1
    assert [e.data for e in krules_app.recorder.of_type("device.forgotten")] == [{"last_seen": last_seen}]
    assert await krules_app.storage.load("sensor-7") == ({}, {})
