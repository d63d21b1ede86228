"""Testing helpers and the ``krules`` pytest plugin.

The ``krules_app`` fixture gives each test an isolated app on memory storage, with a recorder of
every dispatched event, a fake clock and a way to wait until the cascade is quiet::

    async def test_orders_ship(krules_app):
        krules_app.load("rulesets.orders")
        await krules_app.emit("order.submitted", "order-1", {"total": 30})
        await krules_app.settle()
        assert krules_app.recorder.types() == ["order.submitted", ...]

Outside pytest, :class:`KRulesTestApp` works the same (``async with KRulesTestApp() as app``).

The helpers are in :mod:`krules.testing.apps`, the fixture in :mod:`krules.testing.plugin`, and a
throwaway ``redis-server`` in :mod:`krules.testing.redis_server`.
"""

from krules.testing.apps import EventRecorder, FakeClock, KRulesTestApp, RedisModeApp, wait_until
from krules.testing.plugin import krules_app

__all__ = ["EventRecorder", "FakeClock", "KRulesTestApp", "RedisModeApp", "krules_app", "wait_until"]
