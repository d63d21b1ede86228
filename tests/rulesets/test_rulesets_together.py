"""The example modules run side by side (as ``make run`` serves them) without reacting to each other."""

from __future__ import annotations

from typing import Any

from krules.testing import KRulesTestApp

EVERY_RULESET = ("rulesets.orders", "rulesets.sensors", "rulesets.retries", "rulesets.loops")


class AlwaysOk:
    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}


async def test_every_example_gives_the_same_outcome_when_all_are_loaded(krules_app: KRulesTestApp) -> None:
    modules = krules_app.load(*EVERY_RULESET)
    modules[2].api_client = AlwaysOk()

    await krules_app.emit("order.submitted", "order-1", {"total": 30})
    await krules_app.emit("sensor.reading", "sensor-1", {"value": 90})
    await krules_app.emit("user.profile_update", "user-1", {"name": "Ada"})
    await krules_app.emit("api.call", "weather-api", {"url": "https://api.example.test"})
    await krules_app.emit("loops.set", "muted-1", {"colour": "red"})
    await krules_app.settle()

    assert krules_app.recorder.failures == []
    assert await krules_app.stored("order-1") == {"total": 30, "status": "shipped", "paid_amount": 30}
    assert await krules_app.stored("sensor-1") == {"last_reading": 90, "reading_count": 1}
    assert await krules_app.stored("user-1") == {"name": "Ada"}
    assert (await krules_app.stored("weather-api"))["retry_count"] == 0
    assert await krules_app.stored("muted-1") == {"colour": "red", "changes": 1}
    assert [e.subject for e in krules_app.recorder.of_type("alert.overheat")] == ["sensor-1"]
    assert [e.subject for e in krules_app.recorder.of_type("api.call_succeeded")] == ["weather-api"]
